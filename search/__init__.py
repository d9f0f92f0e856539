"""Search: data, training, tracking and the Optuna search (`python -m search.run`)
and equal-time comparisons (`python -m search.compare`).

May import `graphs` and `blocks`; never `app`. Heavy dependencies (mlflow, optuna, liger_kernel)
are imported only inside the functions that use them.
"""
