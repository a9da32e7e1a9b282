"""The reference implementation's ``ta_tok.pth`` (csuhan/Tar) as a tarkit :class:`~tarkit.tatok.TATok`.

``ta_tok.pth`` is ``{"model": {"args": {...constructor kwargs...}, "sd": state_dict}}``. It is read with
``torch.load(weights_only=True)`` (no unpickling of code), its architecture built from ``args`` as the reference
builds it (the teacher's config when at hand, else the weights' shapes), its keys mapped onto tarkit's names, and
every missing, unexpected or wrongly shaped key reported in one error. Registered as the ``tar_reference``
converter (group ``tarkit.tatok_converters``), which :func:`tarkit.tatok.load_tatok` asks for such files.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from tarkit.interfaces import TATokConverter
from tarkit.paths import resolve_path
from tarkit.pretrained import PretrainedLoadError, check_state_dict
from tarkit.tatok import LoadedTATok, TATok
from tarkit_plugins.codebooks import TextAlignedCodebook
from tarkit_plugins.encoders import SigLIP2Encoder
from tarkit_plugins.quantizers import SimVQ
from tarkit_plugins.reference_files import read_official_spec, spec_args


def _require(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise PretrainedLoadError(f"{source}: missing key {key}; is this a TA-Tok checkpoint?")
    return state[key]


def _depth(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in state if (m := pattern.match(k))), default=-1)


# Attention heads are the one shape the weights cannot tell: the SigLIP / SigLIP2 towers by width (B/16, L/16,
# So400m, g-opt), used when the teacher's config is not at hand.
KNOWN_ENCODER_HEADS = {768: 12, 1024: 16, 1152: 16, 1536: 16}
DEFAULT_TEACHER = "google/siglip2-so400m-patch14-384"  # the reference's default args["teacher"]


def teacher_vision_config(teacher: Any) -> Any | None:
    """The vision config of the teacher a reference file names (``args["teacher"]``), or ``None`` if not at hand.

    Tried in turn: a local folder or the hub cache, with no network; then the hub, unless it is offline
    (``HF_HUB_OFFLINE``).
    """
    if not isinstance(teacher, str) or not teacher:
        return None
    import huggingface_hub.constants
    from transformers import AutoConfig

    offline = huggingface_hub.constants.HF_HUB_OFFLINE or Path(teacher).expanduser().is_dir()
    for local_files_only in (True,) if offline else (True, False):
        try:
            config = AutoConfig.from_pretrained(str(resolve_path(teacher)), local_files_only=local_files_only)
        # Not cached, unreachable, unknown to transformers, a bad pkg: path: the caller falls back to the weights.
        except Exception:
            continue
        return getattr(config, "vision_config", config)
    return None


def _encoder_architecture(
    args: dict[str, Any], state: dict[str, torch.Tensor], source: str, fields: tuple[str, ...], overrides: dict
) -> dict[str, Any]:
    """The SigLIP tower's config: the teacher's when its config is at hand (as the reference builds it), else
    the weights' shapes plus the known heads for the width; ``overrides`` win either way. The image size is
    ``args["input_size"]``, which the reference resizes every image to."""
    patch = _require(state, "encoder.embeddings.patch_embedding.weight", source)
    if patch.ndim != 4:
        raise PretrainedLoadError(
            f"{source}: the encoder's patch embedding is {patch.ndim}-D, a NaFlex SigLIP2 tower; only fixed-resolution "
            "SigLIP towers (a 4-D patch convolution, e.g. google/siglip2-so400m-patch14-384) are supported"
        )
    grid = math.isqrt(_require(state, "encoder.embeddings.position_embedding.weight", source).shape[0])
    teacher_name = args.get("teacher", DEFAULT_TEACHER)
    teacher = teacher_vision_config(teacher_name)
    if teacher is not None:
        architecture = {key: getattr(teacher, key) for key in fields if hasattr(teacher, key)} | overrides
    else:
        width = patch.shape[0]
        heads = overrides.get("num_attention_heads") or KNOWN_ENCODER_HEADS.get(width)
        if heads is None:
            raise PretrainedLoadError(
                f"{source}: cannot tell the encoder's attention heads from its weights (width {width}) and the "
                f"teacher config {teacher_name!r} is not at hand; pass encoder_config={{'num_attention_heads': N}} "
                "or make args['teacher'] a local folder with its config.json"
            )
        architecture = {
            "hidden_size": width,
            "patch_size": patch.shape[-1],
            "image_size": grid * patch.shape[-1],
            "num_hidden_layers": _depth(state, "encoder.encoder.layers."),
            "intermediate_size": _require(state, "encoder.encoder.layers.0.mlp.fc1.weight", source).shape[0],
            "num_attention_heads": heads,
        } | overrides
    input_size = int(args.get("input_size", architecture["image_size"]))
    if input_size // architecture["patch_size"] != grid:
        raise PretrainedLoadError(
            f"{source}: input_size {input_size} with patch {architecture['patch_size']} does not give the {grid} x "
            f"{grid} grid of the encoder's position embeddings; fix args['input_size'] or encoder_config"
        )
    return architecture | {"image_size": input_size}


def _input_normalisation(state: dict[str, torch.Tensor], source: str) -> dict[str, list[float]]:
    """The encoder's ``mean``/``std`` from the reference's ``scale_layer`` buffers (its defaults, 0.5, if absent)."""
    stats = {}
    for buffer, name in (("shift", "mean"), ("scale", "std")):
        value = state.get(f"scale_layer.{buffer}", torch.full((1, 3, 1, 1), 0.5))
        if value.numel() != 3:
            raise PretrainedLoadError(
                f"{source}: scale_layer.{buffer} has shape {tuple(value.shape)}, not one value per RGB channel"
            )
        stats[name] = value.flatten().tolist()
    return stats


LEARNED_TEMPERATURE = "bottleneck.regularizer.stochastic_temperature_inv"


def _uses_learned_temperature(regularizer: dict[str, Any]) -> bool:
    """Whether the reference's SimVQ holds the learned ``stochastic_temperature_inv`` (stochastic, temperature < 0)."""
    return bool(regularizer.get("stochastic", False)) and float(regularizer.get("stochastic_temperature", 1.0)) < 0


def _quantizer_args(regularizer: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """``simvq`` arguments equivalent to the reference's SimVQ args (its defaults where the file has none).

    The reference samples from ``softmax(cos * inv)``: ``inv`` is ``1 / stochastic_temperature``, or, when that is
    negative, the file's learned ``bottleneck.regularizer.stochastic_temperature_inv``.
    """
    stochastic = bool(regularizer.get("stochastic", False))
    args = {"l2_normalize": bool(regularizer.get("l2_normalized", False)), "stochastic": stochastic}
    if _uses_learned_temperature(regularizer):
        inverse = float(_require(state, LEARNED_TEMPERATURE, source))
        if not inverse > 0:
            raise PretrainedLoadError(f"{source}: the learned {LEARNED_TEMPERATURE} is {inverse}, not a positive value")
        args["temperature"] = 1.0 / inverse
    elif stochastic:
        args["temperature"] = float(regularizer.get("stochastic_temperature", 1.0))
    return args


def _codebook(bottleneck: dict[str, Any], regularizer: dict[str, Any], state: dict, width: int, source: str) -> Any:
    """SimVQ's ``embedding`` and ``embedding_proj`` as a ``text_aligned`` codebook of the args' size."""
    embedding = _require(state, "bottleneck.regularizer.embedding.weight", source)
    dim = int(bottleneck.get("bottleneck_dim", embedding.shape[1]))
    return TextAlignedCodebook(
        embeddings=None,
        num_codes=int(regularizer.get("codebook_size", embedding.shape[0])),
        dim=dim if dim > 0 else width,  # the reference's bottleneck_dim <= 0 keeps the encoder's width
        embedding_width=embedding.shape[1],
        l2_normalize=False,  # the quantizer normalises, as the reference's SimVQ does
    )


def load_official_tatok(
    path: str | Path,
    load_teacher: bool = False,
    encoder_config: dict[str, Any] | None = None,
    decoder_config: dict[str, Any] | None = None,
    pool_scales: list[int] | None = None,
    quantizer: dict[str, Any] | None = None,
) -> LoadedTATok:
    """A :class:`~tarkit.tatok.TATok` (with its teacher and pool scale) from the reference's ``ta_tok.pth``, built
    as the reference builds it.

    The encoder is the SigLIP tower of ``args["teacher"]`` when that config is at hand (a local folder, the hub
    cache, or the hub when reachable), else the weights' shapes plus the known heads for the width; it reads
    hidden state ``args["select_layer_id"]`` at ``args["input_size"]`` and normalises with the file's
    ``scale_layer`` buffers. The decoder is ``Siglip2VisionConfig()`` with patch 1, ``args["decoder_depth"]``
    layers, ``bottleneck_dim`` channels and the encoder's width; the quantizer follows the ``simvq`` args
    (``l2_normalized``, ``stochastic``, ``stochastic_temperature`` or the learned inverse temperature) and, unlike
    the reference, takes the nearest code in eval mode (pass ``quantizer={"eval_deterministic": False}`` to
    sample as the reference does).

    Args:
        path: the checkpoint file (``pkg:`` paths allowed).
        load_teacher: also build the frozen teacher from the file's ``teacher.*`` weights, if it has them.
        encoder_config: ``SiglipVisionConfig`` fields overriding the teacher's (or the weights').
        decoder_config: ``Siglip2VisionConfig`` fields overriding the reference's decoder defaults.
        pool_scales: scales to serve (default 1, 2, 3).
        quantizer: ``simvq`` arguments overriding the ones the file's args give.
    """
    _, args, state = read_official_spec(path)
    source = str(path)
    bottleneck = spec_args(args.get("bottleneck"), "bottleneck", source)
    regularizer = spec_args(bottleneck.get("regularizer"), "simvq", source)
    architecture = _encoder_architecture(args, state, source, SigLIP2Encoder.ARCHITECTURE_KEYS, encoder_config or {})
    tower = {
        "preset": None,
        "config": architecture,
        "select_layer": int(args.get("select_layer_id", -2)),
        **_input_normalisation(state, source),
    }
    encoder = SigLIP2Encoder(**tower)
    codebook = _codebook(bottleneck, regularizer, state, encoder.width, source)
    simvq_args = _quantizer_args(regularizer, state, source) | (quantizer or {})
    simvq = SimVQ(**simvq_args)
    tatok = TATok(encoder, codebook, simvq, pool_scales, int(args.get("decoder_depth", 3)), decoder_config)

    # Applied above rather than loaded: the normalisation buffers and the learned temperature (when args use it).
    applied = {"scale_layer.shift", "scale_layer.scale"}
    if _uses_learned_temperature(regularizer):
        applied.add(LEARNED_TEMPERATURE)
    kept = encoder.model.config.num_hidden_layers
    model_state = map_official_keys({k: v for k, v in state.items() if k not in applied})
    _load_checked(tatok, model_state, kept, "encoder.model.", source)
    teacher = None
    if load_teacher:
        teacher_state = {f"model.{k.removeprefix('teacher.')}": v for k, v in state.items() if k.startswith("teacher.")}
        if not teacher_state:
            raise PretrainedLoadError(f"{source} has no teacher.* weights; use load_teacher=False")
        teacher = SigLIP2Encoder(**tower)
        _load_checked(teacher, teacher_state, kept, "model.", f"{source} (teacher)")
        teacher.requires_grad_(False).eval()
    return LoadedTATok(tatok, teacher, int(args.get("pool_scale", 1)))


def _load_checked(module: torch.nn.Module, state: dict, kept_layers: int, encoder_prefix: str, source: str) -> None:
    """Load ``state`` into ``module`` after one check of every key, leaving out the encoder weights tarkit drops."""
    state = {k: v for k, v in state.items() if k not in _unused_encoder_keys(state, kept_layers, encoder_prefix)}
    check_state_dict(module, state, source)
    module.load_state_dict(state, strict=False)  # checked above; tied aliases aside, nothing is missing


def map_official_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference key names -> tarkit's (``teacher.*`` is left out; see ``load_teacher``).

    The decoder is ``decoder.vision_model.*`` in files written with transformers 4 and ``decoder.*`` with 5.
    """
    renames = (
        ("encoder.", "encoder.model."),
        ("bottleneck.in_linear.", "in_linear."),
        ("bottleneck.out_linear.", "out_linear."),
        ("bottleneck.regularizer.embedding.weight", "codebook.embedding"),
        ("bottleneck.regularizer.embedding_proj.", "codebook.projection."),
        ("decoder.vision_model.", "decoder."),
    )
    mapped = {}
    for key, value in state.items():
        if key.startswith("teacher."):
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        mapped[key] = value
    return mapped


def _unused_encoder_keys(state: dict[str, torch.Tensor], kept_layers: int, prefix: str = "model.") -> set[str]:
    """Encoder weights tarkit drops by design: layers after the selected hidden state, the final norm and the
    pooling head (the reference loads but never uses them for TA-Tok features)."""
    layer = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    unused = set()
    for key in state:
        match = layer.match(key)
        if (match and int(match.group(1)) >= kept_layers) or key.startswith(
            (f"{prefix}post_layernorm.", f"{prefix}head.")
        ):
            unused.add(key)
    return unused


class ReferenceTATokConverter(TATokConverter):
    """The reference's ``ta_tok.pth`` (``tar_reference`` in ``tarkit.tatok_converters``): files named ``*.pth`` or
    ``*.pt``; ``options`` are :func:`load_official_tatok`'s."""

    def accepts(self, path: Path) -> bool:
        return path.suffix in (".pth", ".pt")

    def load(self, path: Path, load_teacher: bool = False, **options: Any) -> LoadedTATok:
        return load_official_tatok(path, load_teacher=load_teacher, **options)
