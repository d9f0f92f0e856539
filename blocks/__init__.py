"""Blocks: the primitives a graph is made of, one file per family, and their registry.

Imports only torch. Importing this package registers every block family; `REGISTRY` maps a
YAML type name to its Block class.
"""
from blocks import (attention, attention_diff, attention_mla, basic, bytes, embeddings,  # noqa: F401
                    heads, hyper, mlp, ngpt, norms)
from blocks.registry import REGISTRY, Block, Context, config_fields, get, param, register  # noqa: F401
