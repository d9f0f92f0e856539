"""Hand-written reference models, written plainly like nanoGPT, that the benchmark races the
graph-built models against. Parameter names match the graphs' so weights copy across."""
