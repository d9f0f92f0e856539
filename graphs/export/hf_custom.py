"""The `hf` format for graphs no stock transformers class expresses (nGPT, hyper-connections,
...): the standalone folder (graphs/export/standalone.py) plus a small modeling file, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` wraps the generated model.py.
config.json keeps the standalone keys (its `load()` still works) and adds HF's.
"""
from __future__ import annotations

import json
from pathlib import Path

from graphs.plan import Plan
from graphs.export import ExportError, target

MODELING = "modeling_playground.py"
CLASSES = {"AutoConfig": "PlaygroundConfig", "AutoModelForCausalLM": "PlaygroundForCausalLM"}
# attributes of transformers' PreTrainedModel that a top-level node id must not shadow
TAKEN = {"config", "device", "dtype", "generation_config", "name_or_path", "base_model",
         "net_class", "rebuild_buffers"}

SOURCE = '''"""transformers wrapper (trust_remote_code) of the generated model.py, written by graphs.export.

The wrapper adopts the generated model's top-level modules, so its state-dict keys are those of
model.safetensors, and runs the generated forward on them.
"""
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from . import model as generated
from .model import Config  # also tells transformers to copy model.py with this file


class PlaygroundConfig(PretrainedConfig):
    model_type = "lm_playground"


class PlaygroundForCausalLM(PreTrainedModel):
    config_class = PlaygroundConfig

    def __init__(self, config):
        super().__init__(config)
        self.net_class = getattr(generated, getattr(config, "class"))
        net = self.net_class(Config(**config.config))
        self.cfg = net.cfg
        for name, child in net.named_children():
            self.add_module(name, child)
        self._tied_weights_keys = dict(generated.TIED)  # stored once, shared on load
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        out = super().from_pretrained(*args, **kwargs)
        (out[0] if isinstance(out, tuple) else out).rebuild_buffers()
        return out

    @torch.no_grad()
    def rebuild_buffers(self):
        """Buffers (RoPE tables) are computed, not stored: transformers builds the model on the
        meta device and leaves them empty, so they are computed again here."""
        with torch.device("cpu"):
            fresh = self.net_class(self.cfg)
        for name, buf in fresh.named_buffers():
            self.get_buffer(name).copy_(buf)

    def forward(self, input_ids, labels=None, **kwargs):
        logits, _ = self.net_class.forward(self, input_ids)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
'''


def write(plan: Plan, state_dict: dict, out_dir: Path, meta: dict, why: str = "") -> list[Path]:
    """The standalone folder plus modeling_playground.py; config.json gains HF's keys."""
    try:
        from graphs.export import standalone
    except ImportError:
        raise ExportError(f"no stock Hugging Face class fits ({why}) and the standalone "
                          "format that custom code would wrap is not available") from None
    clash = TAKEN & {it.id for it in plan.items}  # top-level nodes and repeat groups
    if clash:
        raise ExportError(f"node ids {sorted(clash)} clash with transformers' PreTrainedModel; "
                          "rename them to export as hf")
    out_dir = Path(out_dir)
    files = standalone.write(plan, state_dict, out_dir, meta)
    config = json.loads((out_dir / "config.json").read_text())  # as standalone.write wrote it
    config.update(model_type="lm_playground", architectures=[CLASSES["AutoModelForCausalLM"]],
                  auto_map={k: f"{MODELING[:-3]}.{v}" for k, v in CLASSES.items()},
                  tie_word_embeddings=bool(config.get("tied")), not_stock_hf_because=why)
    target(out_dir, "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
    modeling = target(out_dir, MODELING)
    modeling.write_text(SOURCE)
    return files + [modeling]
