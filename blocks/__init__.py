"""Blocks: the primitives a graph is made of, one file per family, and their registry.

Imports only torch. Importing this package registers every block family; `REGISTRY` maps a
YAML type name to its Block class.
"""
from blocks import attention, basic, bytes, embeddings, heads, hyper, mlp, ngpt, norms  # noqa: F401
from blocks.registry import REGISTRY, Block, Context, config_fields, get, param, register  # noqa: F401
