"""Hugging Face MoE language models (OLMoE, Qwen2-MoE, Mixtral and kin) on the toolkit's MoELayer.

``model=hf_moe`` (presets ``olmoe``, ``qwen2_moe``, ``mixtral``) loads a transformers causal LM
from a local directory (``pretrained``) or builds it from a config (``config``), then replaces
each sparse MoE block by a ``MoELayer`` holding the same weights. The model returns
``(logits, aux)`` like the toolkit's own backbones, so every method runs on it unchanged and
Lifelong-MoE grows, freezes and masks its experts exactly as in ``moe_lm``.

Why replace the block rather than register our dispatch as a transformers experts backend:
a backend only receives ``(hidden, top_k_index, top_k_weights)`` from the family's own router,
while Lifelong-MoE needs the router too (frozen and trainable gate rows, expert masks that give
the exact previous-phase view, the toolkit's aux losses and routing counts) and needs the
expert count to change after the model is built. The MoELayer carries all of that already.

Structure detection (no list of class names): a sparse block is a module with
- a router child: a 2-D ``weight`` [E, d] and a ``top_k`` attribute; softmax over all experts
  then top-k, renormalised when its ``norm_topk_prob`` is true; a router without that attribute
  always renormalises, which is top-k then softmax (Mixtral);
- an experts child: 3-D ``gate_up_proj`` [E, 2h, d] and ``down_proj`` [E, d, h] (transformers 5
  fused layout; ours is the transpose, see moe/experts.py);
- optionally a shared expert (a child with Linear ``gate_proj``, ``up_proj``, ``down_proj``)
  and a Linear(d, 1) sigmoid gate for it (Qwen2-MoE).
Anything else MoE-like is refused naming what was found. ``export.py`` writes the grown model
back in the family's own format.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lifelong_moe.errors import ConfigError
from lifelong_moe.models import hf_upcycle
from lifelong_moe.moe import AuxList, MoELayer, MoESettings
from lifelong_moe.moe.balance import pool_balance

MISSING_EXTRA = (
    "model=hf_moe needs the [hf] extra (transformers, tokenizers, safetensors): "
    "pip install 'lifelong-moe[hf]'"
)
# Families whose conversion and export are tested (tests/test_hf_moe.py); others whose blocks
# have the same structure convert too.
TESTED_FAMILIES = ("olmoe", "qwen2_moe", "mixtral")
# The per-expert activation names transformers uses -> the toolkit's (moe/experts.py).
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu",
                  "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# method=lifelong_moe's expand_init / gate_init when the config leaves them null: the lowest
# validation perplexity after growth on the tiny OLMoE (results/hf_init.md: gate rows "random"
# beat "mean" in every seed for every expert init, "domain" was worst in every seed; among the
# expert inits copy_most_used was lowest, within 0.008 log-ppl of the others).
GROWTH_INIT = {"expand_init": "copy_most_used", "gate_init": "random"}
# Written beside an export: which experts are frozen and which experience each came from.
EXPERTS_JSON = "lifelong_moe_experts.json"


def require_transformers() -> Any:
    """transformers, imported on first use: an optional extra, and slow to import."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None


@dataclass
class BlockSpec:
    """Where one sparse block's weights live in the transformers model (for the export)."""

    path: str  # module path of the block, e.g. model.layers.0.mlp
    router: str  # child names inside it
    experts: str
    shared: str | None = None
    shared_gate: str | None = None


class _ForwardContext:
    """What the blocks of one forward share: the expert mask going in, the aux coming out."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.aux: AuxList = []


class HFSparseBlock(nn.Module):
    """Stands in for a family's sparse block: hidden [B, L, d] -> [B, L, d], aux to the context.

    ``jitter`` is Mixtral's ``router_jitter_noise``: in training the block's input (router and
    experts alike) is scaled by U(1 - jitter, 1 + jitter) per element, as transformers does.
    """

    def __init__(self, moe: MoELayer, context: _ForwardContext, jitter: float = 0.0) -> None:
        super().__init__()
        self.moe = moe
        self.context = context
        self.jitter = float(jitter)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            hidden_states = hidden_states * noise
        y, aux = self.moe(hidden_states, expert_mask=self.context.mask)
        self.context.aux.append(aux)
        return y


def _is_router(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(m, "top_k")


def _is_experts(m: nn.Module) -> bool:
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(
        isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")
    )


def find_blocks(hf_model: nn.Module) -> list[tuple[str, nn.Module, BlockSpec]]:
    """Every sparse block of the supported structure; a ConfigError for an MoE of another one.

    Another structure is any expert weight left outside the blocks found: a parameter whose
    path names an expert, or a stacked 3-D weight.
    """
    found, unsupported = [], []
    for path, module in hf_model.named_modules():
        children = dict(module.named_children())
        routers = [n for n, c in children.items() if _is_router(c)]
        experts = [n for n, c in children.items() if _is_experts(c)]
        if not (routers and experts):
            continue
        spec = BlockSpec(path, routers[0], experts[0])
        for n, c in children.items():
            if n in (spec.router, spec.experts):
                continue
            if _is_gated_mlp(c) and spec.shared is None:
                spec.shared = n
            elif isinstance(c, nn.Linear) and c.out_features == 1 and spec.shared_gate is None:
                spec.shared_gate = n
            else:
                unsupported.append(f"{path}.{n} ({type(c).__name__})")
        found.append((path, module, spec))
    inside = tuple(f"{p}." for p, _, _ in found)
    for name, param in hf_model.named_parameters():
        if not name.startswith(inside) and ("expert" in name or param.dim() == 3):
            owner = name.rpartition(".")[0]
            unsupported.append(f"{owner} ({type(hf_model.get_submodule(owner)).__name__})")
    if unsupported:
        raise ConfigError(
            f"unsupported MoE block structure: {unsupported[0]}; expected a router "
            f"(weight [E, d], top_k) + experts (gate_up_proj [E, 2h, d], down_proj [E, d, h]) "
            f"+ optional shared expert, as in {', '.join(TESTED_FAMILIES)}"
        )
    return found


def _moe_from_block(
    block: nn.Module, spec: BlockSpec, activation: str, settings: MoESettings
) -> MoELayer:
    """A MoELayer with the block's weights copied (fp32 math is then identical up to rounding)."""
    router = getattr(block, spec.router)
    experts = getattr(block, spec.experts)
    n_experts, d_model = router.weight.shape
    d_hidden = experts.down_proj.shape[-1]
    norm = getattr(router, "norm_topk_prob", None)
    shared = getattr(block, spec.shared) if spec.shared else None
    layer = MoELayer(
        d_model,
        d_hidden,
        n_experts,
        int(router.top_k),
        activation=activation,
        router_noise=settings.router_noise,
        normalize_top_k=bool(norm) if norm is not None else True,
        capacity_factor=settings.capacity_factor,
        dispatch=settings.dispatch,
        gated=True,
        router_order="softmax_topk" if norm is not None else "topk_softmax",
        shared_hidden=0 if shared is None else shared.gate_proj.out_features,
        shared_gate=spec.shared_gate is not None,
        balance_scope=settings.balance_scope,
    )
    dtype = router.weight.dtype
    layer.to(dtype)
    with torch.no_grad():
        layer.router.weight.copy_(router.weight)
        layer.experts.w1.copy_(experts.gate_up_proj.transpose(1, 2))
        layer.experts.w2.copy_(experts.down_proj.transpose(1, 2))
        if shared is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer.shared, name).weight.copy_(getattr(shared, name).weight)
            if spec.shared_gate:
                layer.shared.gate.weight.copy_(getattr(block, spec.shared_gate).weight)
    layer.expert_usage = layer.expert_usage.float()
    return layer


def check_vocab(tokenizer_vocab_size: int, model: nn.Module) -> None:
    """Refuse a tokenizer that can emit ids past the model's embedding rows.

    Embeddings padded beyond the vocabulary (common: rows rounded up to a multiple of 64) are
    fine; fewer rows than the tokenizer's ids would index out of range mid-training.
    """
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise ConfigError(f"{type(model).__name__}: no input embedding to check the vocabulary")
    rows = embed.num_embeddings
    if tokenizer_vocab_size > rows:
        raise ConfigError(
            f"tokenizer vocabulary of {tokenizer_vocab_size} ids: expected at most the model's "
            f"{rows} embedding rows"
        )


def _check_pretrained(pretrained: str) -> Path:
    path = Path(pretrained).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model.pretrained={pretrained!r}: expected a local directory")
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.pretrained={pretrained!r}: expected a config.json in it (a save_pretrained "
            "directory)"
        )
    return path


def load_hf_model(
    family: str,
    pretrained: str | None,
    config: dict[str, Any],
    n_classes: int,
    context_length: int,
    dtype: str,
) -> nn.Module:
    """The family's transformers causal LM, from a local directory or built from a config."""
    tf = require_transformers()
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r}: expected one of {tuple(DTYPES)}")
    if pretrained:
        path = _check_pretrained(pretrained)
        # model.config (the presets' tiny shape) is for training from scratch only: the
        # directory's config.json describes a pretrained model, so it is not read here.
        hf_config = _pretrained_config(tf, path)
        # use_kernels=False: transformers >= 5.2x swaps in Hugging Face Hub kernels by default
        # (and fails without the `kernels` package); 5.17 does not. The same function everywhere,
        # and nothing fetched from a hub.
        model = tf.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=DTYPES[dtype], use_kernels=False
        )
    else:
        _check_family(family)
        keys = {"vocab_size": n_classes, "max_position_embeddings": context_length, **config}
        try:
            hf_config = tf.AutoConfig.for_model(family, **keys)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.config for {family}: {err}") from None
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            # The family's default special ids index its own tokenizer, not this vocabulary.
            token = getattr(hf_config, key, None)
            if key not in config and isinstance(token, int) and token >= hf_config.vocab_size:
                setattr(hf_config, key, None)
        model = tf.AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[dtype])
    return model


def _pretrained_config(tf: Any, path: Path) -> Any:
    """The directory's config; one line when its model_type is unknown to transformers."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"model.pretrained={str(path)!r}: config.json unreadable: {err}"
        ) from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str) or model_type not in tf.CONFIG_MAPPING:
        raise ConfigError(
            f"model.pretrained={str(path)!r}: config.json has model_type={model_type!r}, not a "
            f"transformers {tf.__version__} model type; supported MoE families (tested): "
            f"{', '.join(TESTED_FAMILIES)}"
        )
    return tf.AutoConfig.from_pretrained(path, local_files_only=True)


def _check_family(family: str) -> None:
    tf = require_transformers()
    if family not in tf.CONFIG_MAPPING:
        raise ConfigError(
            f"model.family={family!r}: not a transformers model type; supported MoE families "
            f"(tested): {', '.join(TESTED_FAMILIES)}"
        )


class HFMoECausalLM(nn.Module):
    """Tokens [B, L] -> a transformers MoE causal LM whose sparse blocks are MoELayers -> logits.

    ``n_classes`` is the stream's vocabulary (checked against the embedding rows);
    ``input_shape`` is ``(context_length,)``. ``moe`` supplies the dispatch and router options
    (``dispatch``, ``router_noise``, ``capacity_factor``); expert counts, top-k, widths and the
    router family come from the checkpoint or ``config``. ``upcycle_experts`` (with
    ``upcycle_top_k``, ``upcycle_noise``) upcycles a dense model instead (models/hf_upcycle.py).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        family: str = "olmoe",
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        dtype: str = "float32",
        moe: MoESettings | None = None,
        upcycle_experts: int | None = None,
        upcycle_top_k: int = 2,
        upcycle_noise: float = 0.0,
    ) -> None:
        super().__init__()
        upcycle = None
        if upcycle_experts is not None:
            upcycle = hf_upcycle.check_upcycle(upcycle_experts, upcycle_top_k, upcycle_noise)
        if len(input_shape) != 1:
            raise ConfigError(
                f"model=hf_moe needs token sequences (context_length,), got input shape "
                f"{tuple(input_shape)}; use a text benchmark"
            )
        self.context_length = int(input_shape[0])
        self.growth_init = dict(GROWTH_INIT)
        hf = load_hf_model(
            family, pretrained, dict(config or {}), n_classes, self.context_length, dtype
        )
        check_vocab(n_classes, hf)
        self.family = hf.config.model_type
        # The dtype the checkpoint was stored in: what the export writes.
        stored = getattr(hf.config, "dtype", None) or getattr(hf.config, "torch_dtype", None)
        self.export_dtype = str(stored).replace("torch.", "") if pretrained and stored else dtype
        settings = moe or MoESettings()
        self.balance_loss = settings.balance_loss  # moe/balance.py
        # The family's weight of its balance loss: method.lambda_aux=null uses it.
        coef = getattr(hf.config, "router_aux_loss_coef", None)
        self.aux_loss_coef: float | None = None if coef is None else float(coef)
        # The dense family a model was upcycled from (None: an MoE checkpoint or config).
        self.upcycled_from: str | None = None
        if upcycle is not None:
            self.hf = self._upcycle(hf, settings, *upcycle)
        else:
            self.hf = self._convert(hf, settings)
        # An export of this toolkit says which experts were frozen and where each came from: a
        # run from it continues growing (methods/lifelong_moe.py reads ``expert_origin``).
        record = read_expert_record(pretrained) if pretrained else None
        self.expert_origin: list[int] | None = None
        if record is not None:
            self.expert_origin = self._restore(record, str(pretrained))

    def _convert(self, hf: nn.Module, settings: MoESettings) -> nn.Module:
        blocks = find_blocks(hf)
        if not blocks:
            raise ConfigError(
                f"model family {hf.config.model_type!r} has no sparse MoE block: a dense model; "
                f"expected an MoE such as {', '.join(TESTED_FAMILIES)}"
            )
        act = self._activation(hf)
        self.context = _ForwardContext()
        self.block_specs: list[BlockSpec] = []
        jitter = float(getattr(hf.config, "router_jitter_noise", 0.0) or 0.0)
        for path, block, spec in blocks:
            layer = _moe_from_block(block, spec, act, settings)
            parent_path, _, name = path.rpartition(".")
            parent = hf.get_submodule(parent_path) if parent_path else hf
            setattr(parent, name, HFSparseBlock(layer, self.context, jitter))
            self.block_specs.append(spec)
        return hf

    def _upcycle(
        self, hf: nn.Module, settings: MoESettings, n_experts: int, top_k: int, noise: float
    ) -> nn.Module:
        """Every dense gated MLP -> a MoELayer of its copies (models/hf_upcycle.py)."""
        if find_blocks(hf):
            raise ConfigError(
                f"model.upcycle_experts={n_experts}: model family {hf.config.model_type!r} is "
                "already an MoE; expected a dense model (Llama, Qwen2, OLMo, ...) to upcycle"
            )
        paths = hf_upcycle.find_dense_mlps(hf)
        if not paths:
            raise ConfigError(
                f"model.upcycle_experts={n_experts}: model family {hf.config.model_type!r} has "
                "no dense gated MLP; expected Linear gate_proj, up_proj, down_proj (Llama-style)"
            )
        act = self._activation(hf)
        self.context = _ForwardContext()
        self.block_specs = []
        for path in paths:
            mlp = hf.get_submodule(path)
            layer = hf_upcycle.moe_from_dense(
                mlp, act, n_experts, top_k, noise, settings, where=path
            )
            parent_path, _, name = path.rpartition(".")
            setattr(hf.get_submodule(parent_path), name, HFSparseBlock(layer, self.context))
            self.block_specs.append(BlockSpec(path, router="", experts=""))
        self.upcycled_from = hf.config.model_type
        return hf

    @staticmethod
    def _activation(hf: nn.Module) -> str:
        act = getattr(hf.config, "hidden_act", "silu")
        if act not in HF_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act={act!r}: expected one of {tuple(HF_ACTIVATIONS)} for the experts"
            )
        return HF_ACTIVATIONS[act]

    def _restore(self, record: dict[str, Any], where: str) -> list[int]:
        """Freeze each layer's first ``n_frozen`` experts as the export recorded them; the
        origins come back shifted below 0 (-1 = the exporting run's last experience), so that
        this run's experiences count from 0 as usual and every earlier expert is older."""
        layers = record.get("layers") if isinstance(record, dict) else None
        origin = record.get("expert_origin") if isinstance(record, dict) else None
        paths = [spec.path for spec in self.block_specs]
        n_experts = {self.hf.get_submodule(p).moe.n_experts for p in paths}
        ok = (
            isinstance(layers, dict)
            and sorted(layers) == sorted(paths)
            and isinstance(origin, list)
            and all(isinstance(o, int) for o in origin)
            and {len(origin)} == n_experts
            and all(
                isinstance(v, dict)
                and v.get("n_experts") in n_experts
                and isinstance(v.get("n_frozen"), int)
                and 0 <= v["n_frozen"] <= v["n_experts"]
                for v in layers.values()
            )
        )
        if not ok:
            raise ConfigError(
                f"model.pretrained={where!r}: {EXPERTS_JSON} does not match the model (expected "
                f"layers {paths} with n_experts {sorted(n_experts)}, n_frozen, and one "
                "expert_origin per expert); delete it to start from the weights alone"
            )
        for path in paths:
            self.hf.get_submodule(path).moe.freeze_first(layers[path]["n_frozen"])
        shift = max(origin) + 1
        return [o - shift for o in origin]

    def get_input_embeddings(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    def forward(
        self, x: torch.Tensor, expert_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, AuxList]:
        """x: long [B, L]; logits [B, L, vocab] (fp32 if the model is), one MoEAux per block."""
        if x.shape[1] > self.context_length:
            raise ValueError(f"HFMoECausalLM: {x.shape[1]} tokens, at most {self.context_length}")
        self.context.mask, self.context.aux = expert_mask, []
        try:
            logits = self.hf(input_ids=x, use_cache=False).logits
            aux = self.context.aux
            if self.balance_loss == "transformers":
                aux = pool_balance(aux, self.hf.get_submodule(self.block_specs[0].path).moe.top_k)
            return logits, aux
        finally:
            self.context.mask, self.context.aux = None, []

    def expert_record(self, expert_origin: Sequence[int] | None = None) -> dict[str, Any]:
        """The JSON written beside an export: frozen experts and their experience per layer."""
        layers = {}
        for spec in self.block_specs:
            layer = self.hf.get_submodule(spec.path).moe
            layers[spec.path] = {"n_experts": layer.n_experts, "n_frozen": layer.n_frozen}
        first = next(iter(layers.values()))
        origin = list(expert_origin) if expert_origin is not None else [0] * first["n_experts"]
        return {"family": self.family, "layers": layers, "expert_origin": origin}


def read_expert_record(directory: str | Path) -> dict[str, Any] | None:
    """The record an export wrote, or None for a directory that has none."""
    path = Path(directory) / EXPERTS_JSON
    return json.loads(path.read_text()) if path.is_file() else None
