"""ADM's ``UNetModel`` and ``EncoderUNetModel`` with ADM's constructor arguments and state_dict keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .nn import (
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    conv_nd,
    convert_module_to_f16,
    convert_module_to_f32,
    normalization,
    timestep_embedding,
    zero_module,
)


class _BlockArgs(NamedTuple):
    """Hyper-parameters shared by every residual and attention block of one network."""

    emb_channels: int  # width of the timestep embedding
    dropout: float  # dropout inside residual blocks
    dims: int  # 1, 2 or 3 spatial dimensions
    use_checkpoint: bool  # gradient checkpointing while training
    use_scale_shift_norm: bool  # FiLM-like conditioning of the second norm
    num_heads: int  # attention heads when num_head_channels == -1
    num_head_channels: int  # channels per head, or -1 to use num_heads
    use_new_attention_order: bool  # split q/k/v before heads


class _Torso(nn.Module):
    """What UNetModel and EncoderUNetModel share: timestep embedding, encoder path, middle block."""

    def _build_torso(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float,
        channel_mult: Sequence[float],
        conv_resample: bool,
        dims: int,
        use_checkpoint: bool,
        use_fp16: bool,
        num_heads: int,
        num_head_channels: int,
        num_heads_upsample: int,
        use_scale_shift_norm: bool,
        resblock_updown: bool,
        use_new_attention_order: bool,
    ) -> tuple[int, list[int], int]:
        """Record the constructor arguments (as ADM does) and build ``time_embed``, ``input_blocks``
        and ``middle_block``.

        Returns:
            (channels after the middle block, channels of every input block, final downsampling rate)
        """
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if getattr(self, "num_classes", None) is not None:  # here, as in ADM: same key order, same seeded init
            self.label_emb = nn.Embedding(self.num_classes, model_channels * 4)

        self._block_args = _BlockArgs(
            time_embed_dim, dropout, dims, use_checkpoint, use_scale_shift_norm, num_heads, num_head_channels,
            use_new_attention_order,
        )
        resblock, attention = self._resblock, self._attention
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        self._feature_size = ch
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2
                self._feature_size += ch
        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))
        self._feature_size += ch
        return ch, input_block_chans, ds

    def _resblock(self, ch: int, out_ch: int, **kw) -> ResBlock:
        a = self._block_args
        return ResBlock(
            ch, a.emb_channels, a.dropout, out_channels=out_ch, dims=a.dims, use_checkpoint=a.use_checkpoint,
            use_scale_shift_norm=a.use_scale_shift_norm, **kw,
        )  # fmt: skip

    def _attention(self, ch: int, num_heads: int | None = None) -> AttentionBlock:
        a = self._block_args
        return AttentionBlock(
            ch, num_heads=a.num_heads if num_heads is None else num_heads, num_head_channels=a.num_head_channels,
            use_checkpoint=a.use_checkpoint, use_new_attention_order=a.use_new_attention_order,
        )  # fmt: skip

    def _embed(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.time_embed(timestep_embedding(timesteps, self.model_channels))

    def _torso_modules(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block]

    def convert_to_fp16(self) -> None:
        """Cast the torso's convolutions to float16 (ADM's ``use_fp16`` inference mode)."""
        for m in self._torso_modules():
            m.apply(convert_module_to_f16)
        self.dtype = torch.float16

    def convert_to_fp32(self) -> None:
        """Undo :meth:`convert_to_fp16`."""
        for m in self._torso_modules():
            m.apply(convert_module_to_f32)
        self.dtype = torch.float32


class UNetModel(_Torso):
    """ADM's diffusion UNet: ``model(x, timesteps, y=None) -> (B, out_channels, H, W)``.

    Constructor arguments and state_dict keys are those of guided-diffusion's ``UNetModel``;
    ``attention_resolutions`` holds downsampling rates (``image_size // resolution``). With
    ``use_fp16=True`` the torso's convolutions are stored in float16 from the start (ADM's scripts call
    ``convert_to_fp16()`` after construction); loading a float32 checkpoint casts into them.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        ch, input_block_chans, ds = self._build_torso(
            image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions, dropout,
            channel_mult, conv_resample, dims, use_checkpoint, use_fp16, num_heads, num_head_channels,
            num_heads_upsample, use_scale_shift_norm, resblock_updown, use_new_attention_order,
        )  # fmt: skip
        num_heads_upsample = self.num_heads_upsample

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [self._resblock(ch + ich, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(self._attention(ch, num_heads=num_heads_upsample))
                if level and i == num_res_blocks:
                    up = self._resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims, ch)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1))
        )
        if use_fp16:
            self.convert_to_fp16()

    def _torso_modules(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: (B, in_channels, H, W) noisy images.
            timesteps: (B,) timesteps as the model was trained on (original, not respaced).
            y: (B,) class labels, required exactly when the model is class-conditional.
        Returns:
            (B, out_channels, H, W); with learned sigma the first half is eps, the second v.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "class labels must be given exactly when the model is class-conditional "
                f"(num_classes={self.num_classes}, y {'given' if y is not None else 'missing'})"
            )
        emb = self._embed(timesteps)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


class EncoderUNetModel(_Torso):
    """ADM's noise-aware classifier: the UNet's encoder half and a pooling head.

    ``model(x, timesteps) -> (B, out_channels)`` logits. ``pool`` is one of ``adaptive``,
    ``attention``, ``spatial``, ``spatial_v2``, as in guided-diffusion.
    """

    POOLS = ("adaptive", "attention", "spatial", "spatial_v2")

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"unknown pool {pool!r}; expected one of {self.POOLS}")
        self.pool = pool
        ch, _, ds = self._build_torso(
            image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions, dropout,
            channel_mult, conv_resample, dims, use_checkpoint, use_fp16, num_heads, num_head_channels,
            num_heads_upsample, use_scale_shift_norm, resblock_updown, use_new_attention_order,
        )  # fmt: skip
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels")
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(), AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels)
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048), nn.ReLU(), nn.Linear(2048, self.out_channels)
            )
        else:  # spatial_v2
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048), normalization(2048), nn.SiLU(), nn.Linear(2048, self.out_channels)
            )
        if use_fp16:
            self.convert_to_fp16()

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Args:
            x: (B, in_channels, H, W) noisy images.
            timesteps: (B,) original timesteps.
        Returns:
            (B, out_channels) logits.
        """
        emb = self._embed(timesteps)
        spatial = self.pool.startswith("spatial")
        results = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                results.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            results.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(results, dim=-1))
        return self.out(h.type(x.dtype))
