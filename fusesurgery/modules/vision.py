"""A ViT vision encoder that reproduces CLIP's, SigLIP's and DINOv2's vision towers, and the
wrapper that puts a projection head on any encoder.

DINOv2 adds to the CLIP/SigLIP ViT: a per-channel LayerScale on both residual branches
(``TransformerSelfAttentionLayer``'s ``sa_scale`` / ``mlp_scale``), optional register tokens
inserted after the class token once positions are added, and an unused mask token. Its
parameters keep transformers' shapes (``[1, 1, d_e]`` class token, ``[1, n, d_e]`` position
table) so conversions are pure renames.

Shape notation:
    b: batch size, c: channels, h/w: image side, p: patch side, g: patches per side,
    r: register tokens, s_e: encoder tokens (``g * g`` plus an optional class token and
    registers, less those ``feature_tokens`` leaves out), d_e: encoder width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fusesurgery.modules._init import normal_
from fusesurgery.modules.transformer import TransformerSelfAttentionLayer


class TokenPositionalEmbedding(nn.Module):
    """Learned absolute position embedding added to every image token.

    Args:
        num_tokens: rows of the table: patches plus the class token if any.
        embed_dim: ``d_e``.
        batch_dim: store the table as ``[1, num_tokens, d_e]`` (DINOv2's shape).
        antialias: resize with an antialiased bicubic filter (DINOv2 with registers).
    """

    def __init__(self, num_tokens: int, embed_dim: int, *, batch_dim: bool = False,
                 antialias: bool = False) -> None:
        super().__init__()
        shape = (1, num_tokens, embed_dim) if batch_dim else (num_tokens, embed_dim)
        self.positional_embedding = nn.Parameter(torch.empty(shape))
        normal_(self.positional_embedding, std=embed_dim**-0.5)
        self.antialias = antialias

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``[b, s_e, d_e] -> [b, s_e, d_e]``.

        Args:
            x: the image tokens (class token first, if any).
            grid: ``(g_h, g_w)`` patches of ``x``; where they differ from the square grid the
                table was trained for, the patch rows are resized bicubically to it (the class
                token's row is kept), as transformers' ``interpolate_pos_encoding`` does.
        """
        table = self.positional_embedding.flatten(0, -2)  # [num_tokens, d_e]
        if grid is None or (x.size(1) == table.size(0) and grid[0] == grid[1]):
            return x + table
        return x + self.resized(grid, num_prefix=x.size(1) - grid[0] * grid[1])

    def resized(self, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
        """The table for a ``g_h x g_w`` patch grid, ``[num_prefix + g_h * g_w, d_e]``.

        Raises:
            ValueError: the table's patch rows are not a square grid.
        """
        table = self.positional_embedding.flatten(0, -2)
        prefix, patches = table[:num_prefix], table[num_prefix:]
        side = math.isqrt(patches.size(0))
        if side * side != patches.size(0):
            raise ValueError(f"cannot resize a position table of {patches.size(0)} patch rows: "
                             "not a square grid")
        # [g*g, d_e] -> [1, d_e, g, g] -> [1, d_e, g_h, g_w] -> [g_h*g_w, d_e]
        square = patches.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=False,
                                antialias=self.antialias)
        resized = resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(table.dtype)
        return torch.cat([prefix, resized], dim=0)


class PatchRotaryEmbedding(nn.Module):
    """DINOv3's 2-D rotary position embedding: each patch's centre, in ``[-1, 1]`` on both
    axes, rotates a quarter of each head's dims by its row coordinate and a quarter by its
    column coordinate (rotate-half pairing); the tokens before the patches (class token,
    registers) are not rotated. One instance serves every layer; the tower sets the patch
    grid before running them.

    Args:
        head_dim: ``h_d``, a multiple of 4.
        base: the RoPE base (DINOv3's ``rope_theta``).
    """

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"a 2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self.table: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_grid(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> None:
        """Compute ``cos`` and ``sin`` ``[g_h * g_w, h_d]`` for a ``rows x cols`` patch grid,
        in float32, cast to ``dtype`` (the image's, as transformers does)."""
        quarter = torch.arange(0, 1, 4 / self.head_dim, dtype=torch.float32, device=device)
        inv_freq = 1 / self.base**quarter  # [h_d / 4]
        ys = (torch.arange(0.5, rows, dtype=torch.float32, device=device) / rows) * 2 - 1
        xs = (torch.arange(0.5, cols, dtype=torch.float32, device=device) / cols) * 2 - 1
        centres = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
        angles = 2 * math.pi * centres[:, :, None] * inv_freq[None, None, :]  # [P, 2, h_d/4]
        angles = angles.flatten(1, 2).tile(2)  # [P, h_d]
        self.table = (angles.cos().to(dtype), angles.sin().to(dtype))

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """``[b, s, n_h, h_d] -> [b, s, n_h, h_d]``, the last ``g_h * g_w`` tokens rotated.

        Raises:
            ValueError: no grid was set, or it has more patches than ``x`` has tokens.
        """
        if self.table is None:
            raise ValueError("the 2-D RoPE has no patch grid: the vision tower sets it")
        cos, sin = self.table
        patches = cos.size(0)
        if patches > x.size(1):
            raise ValueError(f"a {patches}-patch RoPE grid for {x.size(1)} tokens")
        prefix, rest = x[:, :-patches], x[:, -patches:]
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        half = rest.size(-1) // 2
        rotated = torch.cat([-rest[..., half:], rest[..., :half]], dim=-1)
        return torch.cat([prefix, rest * cos + rotated * sin], dim=1)


class ClassTokenEmbedding(nn.Module):
    """A learned class token prepended to the patch tokens (CLIP, DINOv2).

    Args:
        embed_dim: ``d_e``.
        batch_dim: store it as ``[1, 1, d_e]`` (DINOv2's shape) rather than ``[d_e]``.
    """

    def __init__(self, embed_dim: int, *, batch_dim: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty((1, 1, embed_dim) if batch_dim else embed_dim))
        normal_(self.weight, std=embed_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, g*g, d_e] -> [b, 1 + g*g, d_e]``."""
        cls = self.weight.to(x.dtype).reshape(1, 1, -1).expand(x.size(0), 1, -1)
        return torch.cat([cls, x], dim=1)


class RegisterTokens(nn.Module):
    """Learned register tokens (DINOv2 with registers), inserted after the class token once
    the position embedding has been added, so they carry no position.

    Args:
        num_tokens: ``r``.
        embed_dim: ``d_e``.
    """

    def __init__(self, num_tokens: int, embed_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))

    def forward(self, x: torch.Tensor, num_prefix: int) -> torch.Tensor:
        """``[b, n + g*g, d_e] -> [b, n + r + g*g, d_e]``, the registers after the first
        ``num_prefix`` tokens (the class token)."""
        registers = self.weight.to(x.dtype).expand(x.size(0), -1, -1)
        return torch.cat([x[:, :num_prefix], registers, x[:, num_prefix:]], dim=1)


class MaskToken(nn.Module):
    """DINOv2's mask token ``[1, d_e]`` (DINOv3's ``[1, 1, d_e]``): used only by masked-image
    pre-training, which fusion never runs. It is held so that a converted or unfused tower
    gives it back."""

    def __init__(self, embed_dim: int, *, batch_dim: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros((1, 1, embed_dim) if batch_dim else (1, embed_dim)))


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (DINOv2's LayerScale). Its parameter
    is ``gamma`` (timm's name), never ``scale``: keys ending ``_scale.scale`` are the fusion
    layers' tanh gates.

    Args:
        embed_dim: ``d_e``.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, s_e, d_e] -> [b, s_e, d_e]``."""
        return x * self.gamma


class VisionTransformer(nn.Module):
    """Patch embedding, optional class token, position embedding, optional pre-norm, layers,
    and a final norm.

    ``ln_post`` is always present (both towers ship it) but applied to the returned hidden
    states only when ``post_norm_hidden`` is set: SigLIP normalises its last hidden state,
    CLIP normalises only its pooled class token.

    Args:
        conv: patch embedding, a ``Conv2d(c, d_e, p, stride=p)``.
        layers: transformer layers.
        token_pos_embedding: position embedding, or None (DINOv3: ``patch_rope``).
        ln_post: final LayerNorm.
        cls_token_embedding: class token, or None.
        ln_pre: LayerNorm after the embeddings, or None.
        post_norm_hidden: apply ``ln_post`` to the returned final hidden states.
        output_layer: return the hidden states after this many layers (0 = embeddings,
            negative counts from the end, as in transformers' ``hidden_states``), un-normed;
            None returns the final hidden states.
        register_tokens: register tokens (DINOv2 with registers), or None.
        mask_token: DINOv2's unused mask token, or None.
        feature_tokens: which tokens to return: ``all``, ``cls_and_patches`` (registers left
            out) or ``patches``.
        patch_rope: DINOv3's 2-D RoPE, shared by the layers' attentions (which hold it as
            ``pos_embeddings``), with ``token_pos_embedding`` None; or None.
    """

    def __init__(
        self,
        *,
        conv: nn.Conv2d,
        layers: list[TransformerSelfAttentionLayer],
        token_pos_embedding: TokenPositionalEmbedding | None,
        ln_post: nn.Module,
        cls_token_embedding: ClassTokenEmbedding | None = None,
        ln_pre: nn.Module | None = None,
        post_norm_hidden: bool = False,
        output_layer: int | None = None,
        register_tokens: RegisterTokens | None = None,
        mask_token: MaskToken | None = None,
        feature_tokens: str = "all",
        patch_rope: PatchRotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        if feature_tokens not in ("all", "cls_and_patches", "patches"):
            raise ValueError(f"unknown feature_tokens {feature_tokens!r}; valid: all, "
                             "cls_and_patches, patches")
        self.conv = conv
        self.cls_token_embedding = cls_token_embedding
        self.register_tokens = register_tokens
        self.mask_token = mask_token
        self.feature_tokens = feature_tokens
        self.patch_rope = patch_rope
        self.token_pos_embedding = token_pos_embedding
        self.ln_pre = ln_pre
        self.layers = nn.ModuleList(layers)
        self.ln_post = ln_post
        self.post_norm_hidden = post_norm_hidden
        if output_layer is not None and output_layer < 0:
            output_layer += len(layers) + 1
        self.output_layer = output_layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images: ``[b, c, h, w]`` pixel values, normalised as the tower expects. A side
                other than the tower's gives another patch grid, and the position table is
                resized to it (``s_e`` changes with it).

        Returns:
            ``[b, s_e, d_e]`` hidden states.

        Raises:
            ValueError: ``images`` is not ``[b, c, h, w]`` with the tower's channels, or is
                smaller than one patch.
        """
        conv = self.conv
        if images.dim() != 4 or images.size(1) != conv.in_channels:
            raise ValueError(f"images must be [b, {conv.in_channels}, h, w], got "
                             f"{list(images.shape)}")
        if min(images.shape[-2:]) < conv.kernel_size[0]:
            raise ValueError(f"images of {images.size(-2)}x{images.size(-1)} pixels are smaller "
                             f"than one {conv.kernel_size[0]}-pixel patch")
        x = conv(images.to(conv.weight.dtype))  # [b, d_e, g_h, g_w]
        grid = (x.size(2), x.size(3))
        x = x.flatten(2).transpose(1, 2)  # [b, g_h*g_w, d_e]
        if self.cls_token_embedding is not None:
            x = self.cls_token_embedding(x)
        if self.token_pos_embedding is not None:
            x = self.token_pos_embedding(x, grid)
        if self.patch_rope is not None:
            self.patch_rope.set_grid(*grid, device=x.device, dtype=conv.weight.dtype)
        num_cls = int(self.cls_token_embedding is not None)
        if self.register_tokens is not None:
            x = self.register_tokens(x, num_cls)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        num_layers = len(self.layers) if self.output_layer is None else self.output_layer
        for layer in self.layers[:num_layers]:
            x = layer(x)
        if self.output_layer is None and self.post_norm_hidden:
            x = self.ln_post(x)
        return self._select(x, num_cls, x.size(1) - grid[0] * grid[1])

    def _select(self, x: torch.Tensor, num_cls: int, num_prefix: int) -> torch.Tensor:
        """The ``feature_tokens`` of ``[b, num_prefix + g_h*g_w, d_e]`` hidden states."""
        if self.feature_tokens == "patches":
            return x[:, num_prefix:]
        if self.feature_tokens == "cls_and_patches" and num_prefix > num_cls:
            return torch.cat([x[:, :num_cls], x[:, num_prefix:]], dim=1)
        return x


def resize_position_grid(table: torch.Tensor, spatial_shapes: torch.Tensor,
                         num_tokens: int) -> torch.Tensor:
    """A square position table resized to each image's patch grid, as SigLIP2 NaFlex does:
    separable linear interpolation whose triangle filter widens by the downscale factor
    (antialiasing), computed in float32 and cast back.

    Args:
        table: ``[g*g, d_e]``, a square ``g x g`` grid in row-major order.
        spatial_shapes: ``[b, 2]`` patch rows and columns ``(h_p, w_p)`` of each image.
        num_tokens: ``n``, the padded token count; rows past ``h_p * w_p`` take the first
            position's row (they are padding, masked out downstream).

    Returns:
        ``[b, n, d_e]``.
    """
    side = math.isqrt(table.size(0))
    sizes = spatial_shapes.to(torch.float32)[:, None]  # [b, 1, 2]
    flat = torch.arange(num_tokens, device=spatial_shapes.device, dtype=torch.float32)
    flat = flat[None, :, None]  # [1, n, 1]
    rows = torch.div(flat, sizes[..., 1:], rounding_mode="floor")
    index = torch.cat([rows, flat - rows * sizes[..., 1:]], dim=-1)  # [b, n, 2] (row, col)
    index = index * (flat < sizes.prod(-1, keepdim=True))
    scale = side / sizes  # source pixels per target pixel, per axis
    support = scale.clamp(min=1)
    centre = (index + 0.5) * scale - 0.5
    source = torch.arange(side, device=spatial_shapes.device, dtype=torch.float32)
    weights = (1 - (source - centre[..., None]).abs() / support[..., None]).clamp(min=0)
    weights = weights / weights.sum(-1, keepdim=True)  # [b, n, 2, g]
    outer = (weights[..., 0, :, None] * weights[..., 1, None, :]).flatten(-2)  # [b, n, g*g]
    return (outer.to(table.device) @ table.float()).to(table.dtype)


class NaFlexVisionTransformer(VisionTransformer):
    """SigLIP2 NaFlex: a linear patch embedding over pre-cut patches, the position table
    resized to each image's own patch grid, and attention that ignores padding patches.

    Arguments as :class:`VisionTransformer`, with ``conv`` a ``Linear(c*p*p, d_e)``.
    """

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            pixel_values: ``[b, n, c*p*p]`` patches of each image in row-major order, padded
                to ``n``.
            pixel_attention_mask: ``[b, n]``, 1 (True) for real patches, 0 for padding; None
                derives it from ``spatial_shapes``.
            spatial_shapes: ``[b, 2]`` patch rows and columns of each image.

        Returns:
            ``[b, n, d_e]`` hidden states; the rows of padding patches are not meaningful.

        Raises:
            ValueError: inputs of the wrong shapes, or grids that do not fit ``n``.
        """
        width = self.conv.in_features
        if pixel_values.dim() != 3 or pixel_values.size(-1) != width:
            more = (" (several images per sample are not supported by a NaFlex tower: give "
                    "one image per sample)" if pixel_values.dim() == 4 else "")
            raise ValueError(f"NaFlex pixel_values must be [b, n_patches, {width}], got "
                             f"{list(pixel_values.shape)}{more}")
        b, n = pixel_values.shape[:2]
        if spatial_shapes is None or tuple(spatial_shapes.shape) != (b, 2):
            got = None if spatial_shapes is None else list(spatial_shapes.shape)
            raise ValueError(f"a NaFlex tower needs spatial_shapes [{b}, 2] (patch rows and "
                             f"columns of each image), got {got}")
        if bool((spatial_shapes <= 0).any()) or bool((spatial_shapes.prod(-1) > n).any()):
            raise ValueError(f"spatial_shapes {spatial_shapes.tolist()} must be positive grids "
                             f"of at most {n} patches")
        if pixel_attention_mask is None:
            pixel_attention_mask = torch.arange(n, device=pixel_values.device)[None] < (
                spatial_shapes.prod(-1)[:, None].to(pixel_values.device))
        if tuple(pixel_attention_mask.shape) != (b, n):
            raise ValueError(f"pixel_attention_mask must be [{b}, {n}], got "
                             f"{list(pixel_attention_mask.shape)}")
        x = self.conv(pixel_values.to(self.conv.weight.dtype))  # [b, n, d_e]
        table = self.token_pos_embedding.positional_embedding.flatten(0, -2)
        x = x + resize_position_grid(table, spatial_shapes, n).to(x.dtype)
        keys = pixel_attention_mask.bool()
        mask = keys[:, None, :].expand(b, n, n)  # [b, n, n]: every token sees real patches
        num_layers = len(self.layers) if self.output_layer is None else self.output_layer
        for layer in self.layers[:num_layers]:
            x = layer(x, mask=mask)
        if self.output_layer is None and self.post_norm_hidden:
            x = self.ln_post(x)
        return x


class ProjectedEncoder(nn.Module):
    """An encoder followed by a projection head into the decoder's width.

    Keys: ``vision.*`` for the encoder, ``projection.*`` for the head.

    Args:
        vision: maps ``images`` to ``[b, s_e, d_e]``.
        projection: maps ``[b, s_e, d_e]`` to ``[b, s_e, d]``.
    """

    def __init__(self, vision: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.vision = vision
        self.projection = projection

    def forward(self, images: torch.Tensor | None = None, **naflex: torch.Tensor) -> torch.Tensor:
        """``[b, c, h, w] -> [b, s_e, d]``, or several images per sample,
        ``[b, n, c, h, w] -> [b, n * s_e, d]``: the encoder runs on the ``b * n`` images and
        each sample's images follow one another, image ``i``'s tokens at
        ``i * s_e .. (i + 1) * s_e - 1`` (the columns of an ``encoder_mask``). The encoder
        output is cast to the head's dtype (a float32 tower may feed a bfloat16 decoder: each
        keeps its own dtype).

        A NaFlex tower takes ``pixel_values`` ``[b, n_patches, c*p*p]``,
        ``pixel_attention_mask`` and ``spatial_shapes`` instead, and gives
        ``[b, n_patches, d]``.

        Raises:
            ValueError: NaFlex inputs for a tower that takes images, or the reverse.
        """
        if isinstance(self.vision, NaFlexVisionTransformer):
            if images is not None or "pixel_values" not in naflex:
                raise ValueError("this tower is SigLIP2 NaFlex: it takes pixel_values "
                                 "[b, n_patches, c*p*p], pixel_attention_mask and "
                                 "spatial_shapes, not images")
            return self._project(self.vision(**naflex))
        if naflex or images is None:
            raise ValueError(f"this tower takes images [b, c, h, w], not "
                             f"{', '.join(naflex) or 'nothing'}")
        if images.dim() == 5:
            b, n = images.shape[:2]
            x = self.vision(images.flatten(0, 1))  # [b*n, s_e, d_e]
            x = x.reshape(b, n * x.size(1), x.size(2))  # [b, n*s_e, d_e]
        else:
            x = self.vision(images)  # [b, s_e, d_e]
        return self._project(x)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        head = next(self.projection.parameters(), None)
        if head is not None and x.dtype != head.dtype:
            x = x.to(head.dtype)
        return self.projection(x)
