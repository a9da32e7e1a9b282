"""The diffusion de-tokenizer (group ``tarkit.detokenizers``, name ``diffusion``): a diffusers denoiser that reads
TA-Tok decoded features through cross-attention, where a text-to-image model reads text embeddings.

    condition [B, N, C] -> LayerNorm -> Linear(C -> W) -> + 2-D position embedding = tokens [B, N, W]
    tokens -> cross-attention keys/values of the denoiser (as text embeddings are in text-to-image)
    images [B, 3, H, W] -> [-1, 1] -> pixel_unshuffle(p) -> (+ tokens on their grid, upsampled, optional)
           (+ 2 coordinate channels) -> denoiser (UNet2DConditionModel or SanaTransformer2DModel) -> prediction

The reference decodes with SANA 600M in a DC-AE latent space; tarkit has no pretrained autoencoder, so the
denoiser works on pixels folded space-to-depth by ``patch_size`` (lossless: a 64 px image with ``p = 4`` is a
16 x 16 x 48 tensor), which keeps the tiny preset fast on a CPU.

Training objective, by scheduler (``scheduler``):
- ``flow_match`` (``FlowMatchEulerDiscreteScheduler``, as the reference's SANA): ``x_t = (1 - s) x_0 + s noise``
  by ``scale_noise``; the denoiser predicts the velocity ``noise - x_0``; sampling integrates it with Euler steps.
- ``ddpm`` / ``ddim`` (``DDPMScheduler`` / ``DDIMScheduler``): ``x_t`` by ``add_noise``; the target follows the
  scheduler's ``prediction_type``: ``epsilon`` (the noise, the default), ``v_prediction`` or ``sample``. Both
  train identically and differ only in the sampler (DDIM is deterministic, so it needs far fewer steps).

With ``x0_prediction`` the denoiser outputs the clean image instead (as in Li & He 2025, "Back to Basics: Let
Denoising Generative Models Denoise"): folded pixels are high-dimensional, noise fills every dimension while
images lie on a low-dimensional manifold, so a small network learns the image far sooner than the noise. The
loss is then the MSE to the clean image at every noise level alike, which (unlike the velocity or epsilon loss)
weighs the high-noise steps, where the condition decides the content, as much as the near-clean ones. Flow
matching turns the guess into the velocity ``(x_t - x_0) / s`` for its Euler step; DDPM/DDIM use the schedulers'
own ``prediction_type="sample"``.

Classifier-free guidance: in training each sample's condition is replaced, with probability
``condition_dropout`` (0.1), by the null condition: all-zero features, as the reference's AR de-tokenizer does,
passed through the same projection. Guided sampling runs the conditional and null rows as one denoiser batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaTransformer2DModel,
    UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn import functional as F

from tarkit.interfaces import DeTokenizer
from tarkit_plugins.presets import preset_values

SCHEDULERS = {"flow_match": FlowMatchEulerDiscreteScheduler, "ddpm": DDPMScheduler, "ddim": DDIMScheduler}
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def _unet(config: dict[str, Any], inputs: int, outputs: int, size: int, width: int) -> nn.Module:
    return UNet2DConditionModel(
        **config, in_channels=inputs, out_channels=outputs, sample_size=size, cross_attention_dim=width
    )


def _sana(config: dict[str, Any], inputs: int, outputs: int, size: int, width: int) -> nn.Module:
    return SanaTransformer2DModel(
        **config, in_channels=inputs, out_channels=outputs, sample_size=size, caption_channels=width
    )


# name -> (builder, the config field that is the condition width). The builder fills in what the de-tokenizer
# derives (channels, grid size, condition width), so backbone_config may not set those fields.
BACKBONES = {"unet": (_unet, "cross_attention_dim"), "sana": (_sana, "caption_channels")}
DERIVED_FIELDS = ("in_channels", "out_channels", "sample_size")

PRESETS: dict[str, dict[str, Any]] = {
    # CPU miniature for 64 px ShapesWorld under the tiny TA-Tok (96-wide features, 144/36/16 tokens): a 5.7 M
    # parameter UNet on the 16 x 16 x 48 folded image, attention only at 8 x 8 and 4 x 4, ~0.9 s per training
    # step of 32 images on one CPU thread. diffusers' UNet reads `attention_head_dim` as the number of heads.
    # Short training needs every shortcut: clean-image prediction, the condition also as input channels, and
    # SANA's flow shift 3.0 (training and sampling spend more steps at high noise, where content is decided).
    "tiny": {
        "condition_dim": 96,
        "image_size": 64,
        "patch_size": 4,
        "backbone": "unet",
        "backbone_config": {
            "block_out_channels": [64, 96, 128],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "attention_head_dim": 4,
            "norm_num_groups": 16,
            "cross_attention_dim": 128,
        },
        "scheduler": "flow_match",
        "scheduler_config": {"shift": 3.0},
        "num_steps": 20,
        "x0_prediction": True,
        "spatial_channels": 16,
    },
    # The same miniature with the reference's backbone family (SANA's linear-attention DiT), for the ablation.
    "tiny-sana": {
        "condition_dim": 96,
        "image_size": 64,
        "patch_size": 4,
        "backbone": "sana",
        "backbone_config": {
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "num_layers": 6,
            "num_cross_attention_heads": 4,
            "cross_attention_head_dim": 32,
            "cross_attention_dim": 128,
            "caption_channels": 128,
            "patch_size": 1,
        },
        "scheduler": "flow_match",
        "scheduler_config": {"shift": 3.0},
        "num_steps": 20,
        "x0_prediction": True,
        "spatial_channels": 16,
    },
    # Paper-width conditions (SigLIP2 so400m: 1152) at 256 px: an SD-style pixel UNet on the 64 x 64 x 48 folded
    # image (~420 M parameters, the scale of the reference's SANA 600M). SANA's flow shift 3.0 moves sampling steps
    # towards high noise, as high resolutions need; velocity prediction, as SANA.
    "base": {
        "condition_dim": 1152,
        "image_size": 256,
        "patch_size": 4,
        "backbone": "unet",
        "backbone_config": {
            "block_out_channels": [256, 512, 768, 768],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 1024,
        },
        "scheduler": "flow_match",
        "scheduler_config": {"shift": 3.0},
        "num_steps": 30,
        "x0_prediction": False,
        "spatial_channels": 0,
    },
}


def grid_position_embedding(tokens: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding ``[tokens, dim]`` of a square grid of condition tokens.

    Cross-attention ignores the order of its keys, so each token carries where it lies. Positions are cell
    centres in image coordinates (``[0, 1]`` scaled to 32 units), so a pooled grid (12 x 12, 6 x 6, 4 x 4)
    places each token at the same image location as the finer grid's tokens it averages.
    """
    grid = math.isqrt(tokens)
    quarter = dim // 4
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid * 32
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    angles = centres[:, None] * omega[None]  # [grid, quarter]
    rows = torch.cat([angles.sin(), angles.cos()], dim=1)[:, None].expand(grid, grid, 2 * quarter)
    cols = torch.cat([angles.sin(), angles.cos()], dim=1)[None, :].expand(grid, grid, 2 * quarter)
    return torch.cat([rows, cols], dim=-1).reshape(tokens, 4 * quarter).float()


class DiffusionDeTokenizer(DeTokenizer):
    """A diffusers denoiser conditioned on TA-Tok decoded features (the reference's SANA de-tokenizer's role).

    Every argument left ``None`` comes from ``preset``; the saved config records the resolved values.

    Args:
        preset: ``"tiny"`` (64 px UNet for the tiny TA-Tok), ``"tiny-sana"`` (the same with a SANA transformer)
            or ``"base"`` (256 px UNet for 1152-wide paper features); ``None`` requires every field.
        condition_dim: ``C``, the TA-Tok teacher width of the condition features.
        image_size: side of the square images drawn (and trained on).
        patch_size: space-to-depth factor ``p`` folding pixels into channels before the denoiser.
        backbone: ``"unet"`` (``UNet2DConditionModel``) or ``"sana"`` (``SanaTransformer2DModel``).
        backbone_config: fields of the diffusers model's config, over the preset's when the backbone is the
            preset's (another backbone starts from diffusers' defaults); channels, ``sample_size`` and the
            condition width (``cross_attention_dim`` for the UNet, ``caption_channels`` for SANA) are set here.
        scheduler: ``"flow_match"`` (velocity target), ``"ddpm"`` or ``"ddim"`` (``prediction_type`` target,
            epsilon by default).
        scheduler_config: fields of the diffusers scheduler's config, over the preset's for the same scheduler.
        num_steps: default number of sampling steps.
        x0_prediction: the denoiser predicts the clean image, converted to the scheduler's target (see the
            module's notes); ``False`` predicts the target directly (velocity, as SANA; or epsilon).
        condition_dropout: probability of training a sample on the null (all-zero) condition, for guidance.
        timestep_sampling: training noise levels, ``"uniform"`` or ``"logit_normal"`` (SD3/SANA's density,
            which favours mid-range noise).
        position_embedding: add a fixed 2-D position embedding to the condition tokens.
        spatial_channels: also feed the condition to the denoiser as this many input channels: the tokens
            through a Linear, laid out on their grid and upsampled (bilinear) to the denoiser's; ``0`` (the
            reference's choice) conditions by cross-attention alone. Cross-attention must first learn to match
            each location to the tokens at that location; the spatial path gives that match for free, which
            matters when training is short.
        coordinate_channels: feed the denoiser two extra input channels holding each location's (y, x) in
            ``[-1, 1]``: convolutions barely know where they are, and redrawing an image needs each location
            to attend to the condition tokens at that location.
    """

    def __init__(
        self,
        preset: str | None = "tiny",
        condition_dim: int | None = None,
        image_size: int | None = None,
        patch_size: int | None = None,
        backbone: str | None = None,
        backbone_config: dict[str, Any] | None = None,
        scheduler: str | None = None,
        scheduler_config: dict[str, Any] | None = None,
        num_steps: int | None = None,
        x0_prediction: bool | None = None,
        condition_dropout: float = 0.1,
        timestep_sampling: str = "uniform",
        position_embedding: bool = True,
        spatial_channels: int | None = None,
        coordinate_channels: bool = True,
    ):
        super().__init__()
        base = preset_values("DiffusionDeTokenizer", PRESETS, preset)
        given = {
            "condition_dim": condition_dim,
            "image_size": image_size,
            "patch_size": patch_size,
            "backbone": backbone,
            "scheduler": scheduler,
            "num_steps": num_steps,
            "x0_prediction": x0_prediction,
            "spatial_channels": spatial_channels,
        }
        resolved = {key: base.get(key) if value is None else value for key, value in given.items()}
        missing = [key for key, value in resolved.items() if value is None]
        if missing:
            raise ValueError(f"DiffusionDeTokenizer: preset=None needs {', '.join(missing)}")
        if resolved["backbone"] not in BACKBONES:
            raise ValueError(f"DiffusionDeTokenizer: backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
        if resolved["scheduler"] not in SCHEDULERS:
            raise ValueError(f"DiffusionDeTokenizer: scheduler must be one of {sorted(SCHEDULERS)}, got {scheduler!r}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"DiffusionDeTokenizer: timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}"
            )
        if not 0.0 <= condition_dropout <= 1.0:
            raise ValueError(f"DiffusionDeTokenizer: condition_dropout must be in [0, 1], got {condition_dropout}")
        if resolved["spatial_channels"] < 0:
            raise ValueError(f"DiffusionDeTokenizer: spatial_channels must be >= 0, got {spatial_channels}")
        size, patch = resolved["image_size"], resolved["patch_size"]
        if patch < 1 or size % patch:
            raise ValueError(f"DiffusionDeTokenizer: image_size {size} is not a multiple of patch_size {patch}")
        same_backbone = resolved["backbone"] == base.get("backbone")
        backbone_config = {**(base.get("backbone_config", {}) if same_backbone else {}), **(backbone_config or {})}
        same_scheduler = resolved["scheduler"] == base.get("scheduler")
        scheduler_config = {**(base.get("scheduler_config", {}) if same_scheduler else {}), **(scheduler_config or {})}
        flow = resolved["scheduler"] == "flow_match"
        if resolved["x0_prediction"] and not flow:
            if scheduler_config.get("prediction_type", "sample") != "sample":
                raise ValueError(
                    "DiffusionDeTokenizer: x0_prediction means prediction_type 'sample', but scheduler_config sets "
                    f"{scheduler_config['prediction_type']!r}; drop one of them"
                )
            scheduler_config = {**scheduler_config, "prediction_type": "sample"}
        build, width_field = BACKBONES[resolved["backbone"]]
        derived = sorted(set(backbone_config) & set(DERIVED_FIELDS))
        if derived:
            raise ValueError(f"DiffusionDeTokenizer: backbone_config may not set {derived}; they follow image_size")
        if width_field not in backbone_config:
            raise ValueError(f"DiffusionDeTokenizer: backbone_config must set {width_field!r}, the condition width")
        width = backbone_config[width_field]
        if position_embedding and width % 4:
            raise ValueError(f"DiffusionDeTokenizer: {width_field} {width} must be a multiple of 4 for positions")

        self.resolved = {
            **resolved,
            "backbone_config": backbone_config,
            "scheduler_config": scheduler_config,
            "condition_dropout": condition_dropout,
            "timestep_sampling": timestep_sampling,
            "position_embedding": position_embedding,
            "coordinate_channels": coordinate_channels,
        }
        self.patch_size, self.num_steps = patch, resolved["num_steps"]
        # only flow matching converts: DDPM/DDIM take the clean image natively (prediction_type "sample")
        self.velocity_from_x0 = flow and resolved["x0_prediction"]
        self.condition_dropout, self.timestep_sampling = condition_dropout, timestep_sampling
        self.use_positions, self.use_coordinates = position_embedding, coordinate_channels
        # Normalise first: the projection then sees unit-scale features whatever the TA-Tok's output scale,
        # and the null condition (zeros) maps to a learned constant (the norm's and projection's biases).
        dim = resolved["condition_dim"]
        self.condition_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        denoiser_config = {k: v for k, v in backbone_config.items() if k != width_field}
        channels = 3 * patch * patch
        inputs = channels + resolved["spatial_channels"] + (2 if coordinate_channels else 0)
        self.spatial_proj = nn.Linear(width, resolved["spatial_channels"]) if resolved["spatial_channels"] else None
        self.denoiser = build(denoiser_config, inputs, channels, size // patch, width)
        # Training draws noise levels from this scheduler's full schedule; sampling builds its own copy, because
        # set_timesteps rewrites a scheduler's timesteps (and scale_noise looks timesteps up in them).
        self.noise_scheduler = SCHEDULERS[resolved["scheduler"]](**scheduler_config)

    def resolved_config(self) -> dict[str, Any]:
        return dict(self.resolved)

    @property
    def condition_dim(self) -> int:
        return self.resolved["condition_dim"]

    @property
    def image_size(self) -> int:
        return self.resolved["image_size"]

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction for ``sample`` at ``timestep`` ``[B]`` given condition tokens ``[B, N, W]``."""
        batch, _, height, width = sample.shape
        inputs = [sample]
        if self.spatial_proj is not None:
            grid = math.isqrt(tokens.shape[1])
            maps = self.spatial_proj(tokens).transpose(1, 2).unflatten(2, (grid, grid))
            # align_corners=False keeps cell centres where grid_position_embedding puts them, at every pool scale
            inputs.append(F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False))
        if self.use_coordinates:
            ys = torch.linspace(-1, 1, height, device=sample.device, dtype=sample.dtype)
            xs = torch.linspace(-1, 1, width, device=sample.device, dtype=sample.dtype)
            inputs.append(torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(batch, 2, height, width))
        return self.call_denoiser(torch.cat(inputs, dim=1), timestep, tokens)

    def call_denoiser(self, sample: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One forward of the diffusers model (the backbones name their inputs differently)."""
        if self.resolved["backbone"] == "unet":
            return self.denoiser(sample, timestep, encoder_hidden_states=tokens).sample
        return self.denoiser(hidden_states=sample, encoder_hidden_states=tokens, timestep=timestep).sample

    def check_condition(self, condition: torch.Tensor) -> None:
        """Raise a one-line ``ValueError`` unless ``condition`` is ``[B, N, condition_dim]`` with ``N`` square."""
        if condition.ndim != 3 or condition.shape[-1] != self.condition_dim:
            raise ValueError(
                f"DiffusionDeTokenizer expects condition features [B, N, {self.condition_dim}], got "
                f"{list(condition.shape)}; was it configured for another TA-Tok (condition_dim)?"
            )
        tokens = condition.shape[1]
        if tokens < 1 or math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(f"DiffusionDeTokenizer: {tokens} condition tokens do not form a square grid")

    def encode_condition(self, condition: torch.Tensor) -> torch.Tensor:
        """Condition features ``[B, N, C]`` -> the denoiser's cross-attention tokens ``[B, N, W]``."""
        tokens = self.condition_proj(condition)
        if self.use_positions:
            tokens = tokens + grid_position_embedding(condition.shape[1], tokens.shape[-1]).to(tokens)
        return tokens

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images in ``[0, 1]`` -> the denoiser's ``[-1, 1]`` space-to-depth tensor."""
        return F.pixel_unshuffle(images * 2 - 1, self.patch_size)

    def to_images(self, sample: torch.Tensor) -> torch.Tensor:
        """The denoiser's space -> images in ``[0, 1]``."""
        return (F.pixel_shuffle(sample, self.patch_size) / 2 + 0.5).clamp(0, 1)

    def _training_timesteps(self, batch: int, device: torch.device) -> torch.Tensor:
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(batch, device=device))
        else:
            u = torch.rand(batch, device=device)
        schedule = self.noise_scheduler.timesteps
        indices = (u * len(schedule)).long().clamp(max=len(schedule) - 1).cpu()
        return schedule[indices].to(device)

    def loss(self, condition: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Denoising loss for images ``[B, 3, H, W]`` in ``[0, 1]``: the MSE of the denoiser's output to its target
        (the clean image with ``x0_prediction``, else the velocity or the scheduler's ``prediction_type``)."""
        self.check_condition(condition)
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"DiffusionDeTokenizer expects images [B, 3, {self.image_size}, {self.image_size}], "
                f"got {list(images.shape)}"
            )
        if len(condition) != len(images):
            raise ValueError(f"{len(condition)} conditions for {len(images)} images")
        if self.training and self.condition_dropout > 0:
            dropped = torch.rand(len(condition), device=condition.device) < self.condition_dropout
            condition = torch.where(dropped[:, None, None], torch.zeros_like(condition), condition)
        clean = self.to_model_space(images)
        noise = torch.randn_like(clean)
        timesteps = self._training_timesteps(len(clean), clean.device)
        scheduler = self.noise_scheduler
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            noisy = scheduler.scale_noise(clean, timesteps, noise)
            # the velocity d x_t / d sigma, which the Euler step integrates, or the clean image it is derived from
            target = clean if self.velocity_from_x0 else noise - clean
        else:
            noisy = scheduler.add_noise(clean, noise, timesteps)
            kind = scheduler.config.prediction_type
            target = {"epsilon": noise, "sample": clean}.get(kind)
            if kind == "v_prediction":
                target = scheduler.get_velocity(clean, noise, timesteps)
            elif target is None:
                raise ValueError(f"DiffusionDeTokenizer: unsupported prediction_type {kind!r}")
        prediction = self.denoise(noisy, timesteps, self.encode_condition(condition))
        return {"loss": F.mse_loss(prediction.float(), target.float())}

    @torch.no_grad()
    def sample(
        self,
        condition: torch.Tensor,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` drawn from noise in ``num_steps`` scheduler steps.

        With ``cfg_scale != 1`` each step runs the conditional and the null rows as one denoiser batch and
        combines them as ``uncond + cfg_scale * (cond - uncond)``; ``cfg_scale == 1`` skips the null rows.
        """
        if sampling:
            raise ValueError(
                f"DiffusionDeTokenizer.sample got unknown options {sorted(sampling)}; it takes cfg_scale, "
                "generator and num_steps"
            )
        self.check_condition(condition)
        steps = self.num_steps if num_steps is None else num_steps
        if steps < 1:
            raise ValueError(f"num_steps must be positive, got {steps}")
        scheduler = type(self.noise_scheduler).from_config(self.noise_scheduler.config)
        scheduler.set_timesteps(steps, device=condition.device)
        dtype = next(self.denoiser.parameters()).dtype
        tokens = self.encode_condition(condition.to(dtype))
        guided = cfg_scale != 1.0
        if guided:
            tokens = torch.cat([tokens, self.encode_condition(torch.zeros_like(condition, dtype=dtype))])
        channels, side = 3 * self.patch_size**2, self.image_size // self.patch_size
        shape = (len(condition), channels, side, side)
        sample = randn_tensor(shape, generator=generator, device=condition.device, dtype=dtype)
        sample = sample * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            inputs = torch.cat([sample, sample]) if guided else sample
            output = self.denoise(inputs, t.expand(len(inputs)), tokens)
            if guided:
                cond, uncond = output.chunk(2)
                output = uncond + cfg_scale * (cond - uncond)
            if self.velocity_from_x0:
                # the Euler step then lands on x0_guess + s_next / s * (x_t - x0_guess); s >= 1 / 1000 here
                output = (sample - output) / (t / scheduler.config.num_train_timesteps)
            sample = scheduler.step(output, t, sample, generator=generator).prev_sample
        return self.to_images(sample.to(dtype))
