"""A vision tower fused into a causal language model by gated cross-attention, as a
transformers model (written by fusesurgery's ``convert --to transformers``; needs only torch
and transformers).

The text model is ``AutoModelForCausalLM.from_config(text_config)`` and the tower
``AutoModel.from_config(vision_config)``, both untouched; fusion adds only the gated
cross-attention layers (run before or after chosen decoder layers through forward hooks, so
the text model's keys stay its own), the projection head and the new tokens' embedding rows.
The maths is fusesurgery's: ``h = x + tanh(g_a) * attn(ca_norm(x), image)``,
``out = h + tanh(g_m) * mlp(mlp_norm(h))``; a text row that attends to no image position
(text before the first image token) leaves the layer unchanged.

Shape notation:
    b: batch size, s: text length, s_e: image positions, d: decoder width,
    d_e: tower width, n_h / n_kv: query / key-value heads, h_d: head width.
"""

from __future__ import annotations

import contextvars
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_fusesurgery_fused import FusedVisionTextConfig

CACHE_FIELD = "fusesurgery_image_state"  # set on the generation cache: keys/values, last row
IMAGE_KWARG = "fusesurgery_image"  # the text model's keyword that carries it to the layers
# while from_pretrained builds the model with dtype "auto": the dtypes the text model and the
# tower are stored in (their sub-configs' ``dtype``), which they keep (see ``from_pretrained``)
STORED_DTYPES: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "fusesurgery_stored_dtypes", default=None)
# while from_pretrained builds the model: requires_grad is set once, after the weights load
# (loading resets it), not also at construction
LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("fusesurgery_loading",
                                                               default=False)
SUB_CONFIGS = {"language_model": "text_config", "vision_tower": "vision_config"}
FUSION_PARTS = ("cross_attention_layers", "projection", "fusion_embedding")
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token",
              "revision", "subfolder")


def _torch_dtype(value) -> torch.dtype | None:
    """A config's ``dtype`` (``torch.bfloat16`` or ``"bfloat16"``) as a floating torch dtype,
    or None where it names none."""
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def stored_dtypes(config) -> dict[str, torch.dtype]:
    """``{"language_model": ..., "vision_tower": ...}``: the dtype each part's sub-config says
    it is stored in (a part whose sub-config names none is left out). ``config`` is a
    :class:`FusedVisionTextConfig` or its ``config.json`` as a dict."""
    found = {}
    for part, key in SUB_CONFIGS.items():
        sub = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(sub, dict):
            value = sub.get("dtype", sub.get("torch_dtype"))
        else:
            value = getattr(sub, "dtype", None)
        if (dtype := _torch_dtype(value)) is not None:
            found[part] = dtype
    return found


def image_token_mask(input_ids: torch.Tensor, image_token_id: int,
                     num_images: int) -> torch.Tensor:
    """Which image each token sees, from the image tokens' positions (what the processor
    returns as ``cross_attention_mask`` and what the model derives when it gets none).

    The j-th image token starts image j's span, which runs to the next image token that does
    not directly follow another one (or to the end): consecutive image tokens share one span,
    text before the first image token sees no image (torchtune's ``VisionCrossAttentionMask``).

    Args:
        input_ids: ``[b, s]`` token ids.
        image_token_id: the image token's id.
        num_images: ``n``, the images per sample (a sample may have fewer image tokens; the
            images past them are padding nobody sees).

    Returns:
        ``[b, s, n]`` bool, True where token ``i`` attends to image ``j``.

    Raises:
        ValueError: a sample has more image tokens than ``num_images``.
    """
    is_image = input_ids == image_token_id  # [b, s]
    ordinal = is_image.long().cumsum(dim=1)  # image tokens up to and including each position
    follows_image = F.pad(is_image[:, :-1], (1, 0), value=False)
    group = (is_image & ~follows_image).long().cumsum(dim=1)  # which run of image tokens
    if input_ids.shape[1] and int(ordinal[:, -1].max()) > num_images:
        raise ValueError(f"a sample has {int(ordinal[:, -1].max())} image tokens and only "
                         f"{num_images} image(s) per sample were given; give one image per "
                         "image token")
    columns = []
    for j in range(num_images):
        at_j = is_image & (ordinal == j + 1)  # [b, s]: the j-th image token
        group_j = (group * at_j).sum(dim=1, keepdim=True)  # [b, 1]
        columns.append((ordinal > j) & (group == group_j) & at_j.any(dim=1, keepdim=True))
    return torch.stack(columns, dim=-1)  # [b, s, n]


class FusionRMSNorm(nn.Module):
    """RMSNorm computed in float32 (parameter ``scale``): Llama's kind casts back, then
    scales by ``scale``; the ``unit_offset`` kind (a Gemma decoder's) scales by
    ``1 + scale`` in float32 and casts after, its ``scale`` starting at zero."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.scale = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.scale.float())).type_as(x)
        return self.scale * normed.to(x.dtype)


class FusionTanhGate(nn.Module):
    """``x * tanh(scale)``; ``scale`` starts at 0, so a new gate passes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.tanh()


class FusionSwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def attends_in_float32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the cross-attention computes in float32 for inputs of ``dtype`` on
    ``device``: half-precision inputs on the CPU (see :class:`FusionCrossAttention`)."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)


class FusionCrossAttention(nn.Module):
    """Grouped-query cross-attention onto the image, per-head RMSNorms on q and k, no RoPE.

    On the CPU the image's keys and values keep their ``n_kv`` heads (SDPA's ``enable_gqa``
    pairs the query heads with them, bitwise what copies per query head give there; they are
    stored contiguous per head, which the kernel reads faster), and bfloat16 / float16
    inputs attend in float32: keys and values are cast up once per image (exactly), the
    queries on every call, and the output is cast back before ``output_proj``. For a
    one-token query over hundreds of image positions (a decoding step with an image) the
    CPU's half-precision SDPA kernel costs about 6-9x its float32 one (an AVX2 CPU without
    bfloat16 instructions), and it rounds the probabilities to the half dtype before
    weighing the values. fusesurgery's own cross-attention (``load_fused``) computes the
    same way, so the two agree bitwise. Elsewhere the keys and values are repeated per query
    head once per image and attended in the inputs' dtype.
    """

    def __init__(self, config: FusedVisionTextConfig) -> None:
        super().__init__()
        d, h_d = config.hidden_size, config.fusion_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.fusion_num_heads, config.fusion_num_kv_heads, h_d)
        self.q_proj = nn.Linear(d, self.num_heads * h_d, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * h_d, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * h_d, bias=False)
        self.output_proj = nn.Linear(self.num_heads * h_d, d, bias=False)
        unit_offset = config.fusion_norm_unit_offset
        self.q_norm = FusionRMSNorm(h_d, config.qk_norm_eps, unit_offset)
        self.k_norm = FusionRMSNorm(h_d, config.qk_norm_eps, unit_offset)

    def project_kv(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, s_e, d] -> (k, v)``, each ``[b, n_kv, s_e, h_d]`` on the CPU (float32 for
        half-precision inputs) and ``[b, n_h, s_e, h_d]`` elsewhere (the key/value heads
        repeated for their query heads): computed once per image, reused by every decoding
        step."""
        b, s_e, _ = image.shape
        k = self.k_norm(self.k_proj(image).view(b, s_e, self.num_kv_heads, self.head_dim))
        v = self.v_proj(image).view(b, s_e, self.num_kv_heads, self.head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if image.device.type == "cpu":  # contiguous per head: the kernel reads them faster
            dtype = torch.float32 if attends_in_float32(k.dtype, k.device) else k.dtype
            k = k.to(dtype, memory_format=torch.contiguous_format)
            v = v.to(dtype, memory_format=torch.contiguous_format)
        elif self.num_kv_heads != self.num_heads:
            group = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """``x [b, s, d]``, ``k``, ``v`` from :meth:`project_kv`, ``mask [b, s, s_e]`` bool
        (True = attend) or None -> ``[b, s, d]``."""
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.num_heads, self.head_dim)).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.to(k.dtype), k, v, attn_mask=None if mask is None else mask[:, None, :, :],
            enable_gqa=k.shape[1] != q.shape[1])
        return self.output_proj(out.to(q.dtype).transpose(1, 2).reshape(b, s, -1))


class FusionCrossAttentionLayer(GradientCheckpointingLayer):
    """The gated cross-attention layer wrapped around one decoder layer (recomputed in the
    backward pass under ``gradient_checkpointing_enable()``, as the decoder layers are)."""

    def __init__(self, config: FusedVisionTextConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.ca_norm = FusionRMSNorm(d, config.ca_norm_eps, config.fusion_norm_unit_offset)
        self.attn = FusionCrossAttention(config)
        self.ca_scale = FusionTanhGate()
        self.mlp_norm = FusionRMSNorm(d, config.ca_norm_eps, config.fusion_norm_unit_offset)
        self.mlp = FusionSwiGLU(d, config.fusion_intermediate_size)
        self.mlp_scale = FusionTanhGate()

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """``x [b, s, d]`` -> ``[b, s, d]``; rows whose mask row is all False are unchanged."""
        skip_rows = None
        if mask is not None:
            skip_rows = ~mask.any(dim=-1, keepdim=True)  # [b, s, 1]
            mask = mask | skip_rows  # a finite softmax on rows whose output is zeroed
        attn_out = self.attn(self.ca_norm(x), k, v, mask)
        if skip_rows is not None:
            attn_out = attn_out.masked_fill(skip_rows, 0.0)
        h = x + self.ca_scale(attn_out)
        mlp_out = self.mlp(self.mlp_norm(h))
        if skip_rows is not None:
            mlp_out = mlp_out.masked_fill(skip_rows, 0.0)
        return h + self.mlp_scale(mlp_out)


class FusionProjection(nn.Module):
    """Tower width to decoder width: ``w2(gelu(w1 x))`` (``mlp``) or ``output(x)``
    (``linear``)."""

    def __init__(self, config: FusedVisionTextConfig) -> None:
        super().__init__()
        d_e, d = config.vision_hidden_size, config.hidden_size
        self.kind = config.projection
        if self.kind == "mlp":
            self.w1 = nn.Linear(d_e, d)
            self.w2 = nn.Linear(d, d)
        else:
            self.output = nn.Linear(d_e, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            return self.w2(F.gelu(self.w1(x)))
        return self.output(x)


class FusedVisionTextPreTrainedModel(PreTrainedModel):
    config_class = FusedVisionTextConfig
    config: FusedVisionTextConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _no_split_modules = ["FusionCrossAttentionLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, FusionTanhGate):
            module.scale.zero_()
        elif isinstance(module, FusionRMSNorm):
            module.scale.fill_(0.0 if module.unit_offset else 1.0)
        elif isinstance(module, nn.Linear | nn.Embedding):
            module.weight.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


class FusedVisionTextForConditionalGeneration(FusedVisionTextPreTrainedModel, GenerationMixin):
    """The fused model: ``vision_tower`` -> ``projection`` -> gated cross-attention in
    ``language_model``'s layers ``config.fusion_layers``.

    Keys: ``language_model.*`` and ``vision_tower.*`` are the sources' own transformers
    names; ``cross_attention_layers.{i}.*`` (the layer at decoder layer ``i``),
    ``projection.*`` and ``fusion_embedding.weight`` (rows of the new tokens) are fusion's.
    """

    def __init__(self, config: FusedVisionTextConfig) -> None:
        super().__init__(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.projection = FusionProjection(config)
        self.fusion_embedding = nn.Embedding(config.fusion_vocab_size, config.hidden_size)
        self.cross_attention_layers = nn.ModuleDict(
            {str(i): FusionCrossAttentionLayer(config) for i in config.fusion_layers})
        layers = self.language_model.base_model.layers
        for i, layer in enumerate(layers):
            name = str(i)
            if i in config.fusion_layers and config.fusion_first:
                layer.register_forward_pre_hook(self._fusion_before(name), with_kwargs=True)
            elif i in config.fusion_layers:
                layer.register_forward_pre_hook(self._take_image, with_kwargs=True)
                layer.register_forward_hook(self._fusion_after(name))
            else:  # the image reaches every layer's kwargs; only fusion layers keep it
                layer.register_forward_pre_hook(self._drop_image, with_kwargs=True)
        self._cache_keyword = ("cache" if "cache" in inspect.signature(
            self.language_model.forward).parameters else "past_key_values")
        for part, dtype in (STORED_DTYPES.get() or {}).items():
            # transformers builds every part in one dtype and then casts each stored tensor to
            # its parameter's dtype: a part built in its stored dtype loads without a cast.
            # Parameters only: buffers (RoPE's float32 inverse frequencies) stay as built
            for module in getattr(self, part).modules():
                for name, param in module.named_parameters(recurse=False):
                    if param.is_floating_point() and param.dtype != dtype:
                        module._parameters[name] = nn.Parameter(
                            param.to(dtype), requires_grad=param.requires_grad)
        self.post_init()
        if not LOADING.get():
            self.set_trainable(decoder=config.decoder_trainable,
                               encoder=config.encoder_trainable,
                               fusion=config.fusion_trainable)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers' ``from_pretrained``, except that without a ``dtype`` (or with
        ``"auto"``) the text model and the tower keep the dtypes they are stored in (their
        sub-configs' ``dtype``: a bfloat16 decoder beside a float32 tower stays so, where
        transformers would cast everything to the top config's ``dtype``); what fusion added
        takes that top ``dtype`` (the decoder's). Loading makes every parameter trainable, so
        the config's trainable parts are set again afterwards (see :meth:`set_trainable`)."""
        requested = kwargs.get("dtype", kwargs.get("torch_dtype"))
        parts = None
        if requested is None or requested == "auto":
            config = kwargs.get("config")
            if not isinstance(config, FusedVisionTextConfig):
                config, _ = FusedVisionTextConfig.get_config_dict(
                    pretrained_model_name_or_path,
                    **{key: kwargs[key] for key in HUB_KWARGS if key in kwargs})
            parts = stored_dtypes(config)
        token, loading = STORED_DTYPES.set(parts), LOADING.set(True)
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        finally:
            STORED_DTYPES.reset(token)
            LOADING.reset(loading)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for part, key in SUB_CONFIGS.items():  # the sub-configs say what each part now is
            sub = getattr(model.config, key, None)
            parameter = next(getattr(model, part).parameters(), None)
            if sub is not None and parameter is not None:
                sub.dtype = parameter.dtype
        model.set_trainable(decoder=model.config.decoder_trainable,
                            encoder=model.config.encoder_trainable,
                            fusion=model.config.fusion_trainable)
        return loaded

    def fusion_parameters(self) -> dict[str, nn.Parameter]:
        """What fusion added: the cross-attention layers, the projection and the new tokens'
        rows, by name."""
        return {f"{part}.{name}": param for part in FUSION_PARTS
                for name, param in getattr(self, part).named_parameters()}

    def set_trainable(self, *, decoder: bool = False, encoder: bool = False,
                      fusion: bool = True) -> None:
        """Set ``requires_grad``: torchtune's ``DeepFusionModel`` defaults train the fusion
        parameters only; the text model (its embedding's original rows included) and the
        tower stay frozen. Loading applies the config's ``decoder_trainable``,
        ``encoder_trainable`` and ``fusion_trainable``
        (``from_pretrained(DIR, decoder_trainable=True)`` overrides them)."""
        for param in self.language_model.parameters():
            param.requires_grad_(decoder)
        for param in self.vision_tower.parameters():
            param.requires_grad_(encoder)
        for param in self.fusion_parameters().values():
            param.requires_grad_(fusion)

    # --- the hooks that run a cross-attention layer around a decoder layer. The image's keys,
    # values and mask travel as a keyword argument of the text model's call, which hands its
    # extra keywords to every decoder layer: a layer recomputed under gradient checkpointing
    # gets them again, and nothing is kept on the model between calls.

    def _cross(self, name: str, x: torch.Tensor, image: tuple | None) -> torch.Tensor:
        if image is None:  # no image and nothing cached: the layer adds nothing
            return x
        keys_values, mask = image
        k, v = keys_values[name]
        return self.cross_attention_layers[name](x, k, v, mask)

    @staticmethod
    def _drop_image(module, args, kwargs):
        kwargs.pop(IMAGE_KWARG, None)
        return args, kwargs

    @staticmethod
    def _take_image(module, args, kwargs):
        module._fusesurgery_image = kwargs.pop(IMAGE_KWARG, None)
        return args, kwargs

    def _fusion_before(self, name: str):
        def hook(module, args, kwargs):
            image = kwargs.pop(IMAGE_KWARG, None)
            if args:
                return (self._cross(name, args[0], image), *args[1:]), kwargs
            kwargs["hidden_states"] = self._cross(name, kwargs["hidden_states"], image)
            return args, kwargs
        return hook

    def _fusion_after(self, name: str):
        def hook(module, args, output):
            image = module.__dict__.pop("_fusesurgery_image", None)
            if isinstance(output, tuple):
                return (self._cross(name, output[0], image), *output[1:])
            return self._cross(name, output, image)
        return hook

    # --- transformers plumbing

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    # --- the computation

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` ids (the new tokens' from ``text_vocab_size`` on) -> ``[b, s, d]``."""
        vocab = self.config.text_vocab_size
        is_new = input_ids >= vocab
        table = self.get_input_embeddings()
        original = table(input_ids.clamp(max=vocab - 1))
        new = self.fusion_embedding((input_ids - vocab).clamp(min=0)).to(original.dtype)
        scale = getattr(table, "embed_scale", None)  # Gemma's scaled table: new rows too
        if scale is not None:
            new = new * scale.to(new.dtype)
        return torch.where(is_new.unsqueeze(-1), new, original)

    def get_image_features(self, pixel_values: torch.Tensor,
                           pixel_attention_mask: torch.Tensor | None = None,
                           spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """``[b, c, h, w]`` or ``[b, n, c, h, w]`` -> the projected images ``[b, n * s_e, d]``
        (image ``j``'s positions are ``j * s_e`` to ``(j + 1) * s_e``). A NaFlex tower takes
        ``[b, P, c*p*p]`` or ``[b, n, P, c*p*p]`` patches with their ``pixel_attention_mask``
        and ``spatial_shapes`` (see :meth:`naflex_inputs`); its ``s_e`` is ``P``, padding
        patches included (the cross-attention mask leaves them out).

        Raises:
            ValueError: NaFlex inputs for a tower that takes images, or the reverse.
        """
        b = pixel_values.shape[0]
        naflex = {}
        if self.config.vision_naflex:
            pixel_values, naflex = self.naflex_inputs(pixel_values, pixel_attention_mask,
                                                      spatial_shapes)
        elif pixel_attention_mask is not None or spatial_shapes is not None:
            raise ValueError("pixel_attention_mask and spatial_shapes are NaFlex inputs and "
                             "this model's tower takes images [b, c, h, w]")
        else:
            pixel_values = pixel_values.flatten(0, 1) if pixel_values.dim() == 5 else pixel_values
        layer = self.config.vision_feature_layer
        tower_dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values=pixel_values.to(tower_dtype),
                                output_hidden_states=layer is not None, **naflex)
        features = self.select_tokens(
            out.last_hidden_state if layer is None else out.hidden_states[layer])
        head = next(self.projection.parameters())
        projected = self.projection(features.to(head.dtype))  # [b * n, s_e, d]
        return projected.reshape(b, -1, projected.shape[-1])

    def naflex_inputs(self, pixel_values: torch.Tensor,
                      pixel_attention_mask: torch.Tensor | None,
                      spatial_shapes: torch.Tensor | None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A NaFlex tower's inputs, ``n`` images per sample flattened into the batch:
        ``pixel_values`` ``[b, P, c*p*p]`` or ``[b, n, P, c*p*p]`` (each image's patches in
        row-major order, padded to ``P``), ``spatial_shapes`` ``[b, 2]`` or ``[b, n, 2]``
        (patch rows and columns) and ``pixel_attention_mask`` ``[b, P]`` or ``[b, n, P]``
        (1 = a real patch; None: the first ``rows * columns`` patches are real).

        Returns:
            ``pixel_values`` ``[b * n, P, c*p*p]`` and ``{"pixel_attention_mask": [b * n, P],
            "spatial_shapes": [b * n, 2]}``.

        Raises:
            ValueError: shapes that do not fit one another.
        """
        vision = self.config.vision_config
        width = vision.num_channels * vision.patch_size ** 2
        if pixel_values.dim() not in (3, 4) or pixel_values.shape[-1] != width:
            raise ValueError(f"a NaFlex tower takes pixel_values [b, n_patches, {width}] (or "
                             f"[b, n, n_patches, {width}]: patches of "
                             f"{vision.num_channels} x {vision.patch_size} x "
                             f"{vision.patch_size}), got {list(pixel_values.shape)}")
        lead, num_patches = tuple(pixel_values.shape[:-2]), pixel_values.shape[-2]
        if spatial_shapes is None or tuple(spatial_shapes.shape) != (*lead, 2):
            got = None if spatial_shapes is None else list(spatial_shapes.shape)
            raise ValueError(f"a NaFlex tower needs spatial_shapes {[*lead, 2]} (patch rows "
                             f"and columns of each image), got {got}")
        if pixel_attention_mask is None:
            pixel_attention_mask = torch.arange(num_patches, device=pixel_values.device) < (
                spatial_shapes.prod(-1, keepdim=True).to(pixel_values.device))
        if tuple(pixel_attention_mask.shape) != (*lead, num_patches):
            raise ValueError(f"pixel_attention_mask must be {[*lead, num_patches]}, got "
                             f"{list(pixel_attention_mask.shape)}")
        if pixel_values.dim() == 4:
            pixel_values, pixel_attention_mask, spatial_shapes = (
                pixel_values.flatten(0, 1), pixel_attention_mask.flatten(0, 1),
                spatial_shapes.flatten(0, 1))
        return pixel_values, {"pixel_attention_mask": pixel_attention_mask,
                              "spatial_shapes": spatial_shapes}

    def select_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The tower's output ``[b, n_cls + n_reg + n_patches, d_e]`` (class tokens, registers,
        patches) less what ``config.encoder_tokens`` leaves out: ``[b, s_e, d_e]``."""
        tokens = self.config.encoder_tokens
        n_cls, n_reg = self.config.vision_num_cls_tokens, self.config.vision_num_register_tokens
        if tokens == "patches":
            return features[:, n_cls + n_reg:]
        if tokens == "cls_and_patches" and n_reg:
            return torch.cat([features[:, :n_cls], features[:, n_cls + n_reg:]], dim=1)
        return features

    def _cross_mask(self, input_ids, cross_attention_mask, previous_row, num_images, s_e):
        """``[b, s, n * s_e]`` bool (True = attend). A given mask is ``[b, s, n]`` (per image,
        as the processor returns it) or ``[b, s, n * s_e]``; without one it is derived from
        the image tokens in ``input_ids`` as the processor derives it (``previous_row``
        ``[b, n * s_e]``: what the last token of earlier steps saw). None: attend to all."""
        if cross_attention_mask is not None:
            mask = cross_attention_mask.bool()
            if mask.shape[-1] == num_images and num_images * s_e != num_images:
                mask = mask.repeat_interleave(s_e, dim=-1)
            return mask
        if input_ids is None or self.config.image_token_id is None:
            return None
        if previous_row is not None:  # a decoding step continues the span it is in (generate
            # gives images at the first step only, so later image tokens open no new span)
            return previous_row[:, None, :].expand(-1, input_ids.shape[1], -1)
        mask = image_token_mask(input_ids, self.config.image_token_id, num_images)
        return mask.repeat_interleave(s_e, dim=-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache=None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.LongTensor | None = None,
        **kwargs,
    ):
        """
        Args:
            input_ids: ``[b, s]``; ``image_token_id`` marks where the image starts to count.
            attention_mask: ``[b, s_past + s]`` padding mask, as for the text model.
            pixel_values: ``[b, c, h, w]`` (one image per sample) or ``[b, n, c, h, w]``, or
                None (text only: the fusion layers do no work; or a decoding step that reads
                the image keys and values cached at the first step).
            cross_attention_mask: ``[b, s, n]`` (True = the token attends to image ``j``, as
                the processor returns it) or ``[b, s, n * s_e]`` per image position; None
                derives it from the image tokens (:func:`image_token_mask`): the j-th image
                token and the text after it see image ``j``, earlier text sees none.
            labels: ``[b, s]`` for the language-model loss, shifted inside as transformers'
                causal LMs do (-100 = ignored; so are the image tokens and any new token,
                which the output projection has no row for).
            past_key_values: the generation cache (``cache`` in newer transformers).
            use_cache: keep a cache.
            pixel_attention_mask: a NaFlex tower's (``config.vision_naflex``) ``[b, P]`` or
                ``[b, n, P]``, 1 for real patches; no token attends to a padding patch,
                whatever ``cross_attention_mask`` says (``pixel_values`` are then
                ``[b, P, c*p*p]`` or ``[b, n, P, c*p*p]``).
            spatial_shapes: a NaFlex tower's ``[b, 2]`` or ``[b, n, 2]`` patch rows and
                columns of each image.

        Returns:
            The text model's ``CausalLMOutputWithPast`` (logits ``[b, s, v]``).
        """
        cache = cache if cache is not None else past_key_values
        if labels is not None:  # the new tokens are input-only: the output has no row for them
            labels = labels.masked_fill(labels >= self.config.text_vocab_size, -100)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        state = getattr(cache, CACHE_FIELD, None) if cache is not None else None
        keys_values, previous_row, num_images = (None, None, 1) if state is None else state
        real_patches = None
        if pixel_values is not None:  # new images: their keys and values, once per call
            several = pixel_values.dim() == (4 if self.config.vision_naflex else 5)
            num_images = pixel_values.shape[1] if several else 1
            image = self.get_image_features(pixel_values, pixel_attention_mask,
                                            spatial_shapes)  # [b, n * s_e, d]
            keys_values = {name: layer.attn.project_kv(image)
                           for name, layer in self.cross_attention_layers.items()}
            previous_row = None
            if self.config.vision_naflex:  # [b, n * P]: which image positions are real
                _, naflex = self.naflex_inputs(pixel_values, pixel_attention_mask,
                                               spatial_shapes)
                real_patches = naflex["pixel_attention_mask"].bool().reshape(
                    pixel_values.shape[0], -1)
        image = None
        if keys_values is not None:  # else text only: the fusion layers do nothing at all
            s_e = next(iter(keys_values.values()))[0].shape[2] // num_images
            mask = self._cross_mask(input_ids, cross_attention_mask, previous_row,
                                    num_images, s_e)
            if real_patches is not None:  # no token sees a padding patch (later steps keep
                # the last row, so neither do they)
                real_patches = real_patches[:, None, :].to(inputs_embeds.device)
                mask = (real_patches.expand(-1, inputs_embeds.shape[1], -1) if mask is None
                        else mask & real_patches)
            # a mask that lets every token see every image position (each decoding step after
            # the image token) is no mask: the layers then skip masking and the masked kernel
            image = (keys_values, None if mask is not None and bool(mask.all()) else mask)
            kwargs[IMAGE_KWARG] = image
        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            position_ids=position_ids, labels=labels, use_cache=use_cache,
            **{self._cache_keyword: cache}, **kwargs)
        returned = getattr(outputs, self._cache_keyword, None)
        if returned is not None and image is not None:
            setattr(returned, CACHE_FIELD,
                    (keys_values, None if mask is None else mask[:, -1, :], num_images))
        return outputs

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """As the text model's, and after the first step no pixel values or given mask: the
        image's keys and values and the last mask row come from the cache."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            for name in ("pixel_values", "cross_attention_mask", "pixel_attention_mask",
                         "spatial_shapes"):
                inputs[name] = None
        return inputs


# save_pretrained writes these files beside the weights (and auto_map), so a saved model
# loads with transformers alone as the export did
FusedVisionTextForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["FusedVisionTextForConditionalGeneration", "FusedVisionTextPreTrainedModel"]
