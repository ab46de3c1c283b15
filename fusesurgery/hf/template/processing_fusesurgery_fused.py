"""Processor of a vision tower fused into a causal language model by gated cross-attention
(written by fusesurgery's ``convert --to transformers``; needs only torch and transformers).

One image token per image (it is not expanded: the image reaches the text through
cross-attention, not as positions in the sequence). ``__call__`` tokenizes the text with the
fused tokenizer, runs the tower's own image processor and returns the cross-attention mask the
model derives from the image tokens: the j-th image token and the text after it see image j
until the next run of image tokens, earlier text sees no image.

Shape notation:
    b: batch size, s: text length, n: images per sample (the most in the batch),
    c/h/w: image channels and side.
"""

from __future__ import annotations

import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .modeling_fusesurgery_fused import image_token_mask

# Used when the decoder's tokenizer has no chat template of its own: each message as
# "role: content", images where the message puts them.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def naflex_batch(processed, counts: list[int], n: int) -> dict[str, torch.Tensor]:
    """A NaFlex image processor's output on the batch's images (in order) as model inputs:
    with one image per sample (``n == 1``) ``pixel_values`` ``[b, P, c*p*p]``,
    ``pixel_attention_mask`` ``[b, P]`` and ``spatial_shapes`` ``[b, 2]``, as the tower
    takes them; with more, ``[b, n, P, c*p*p]``, ``[b, n, P]`` and ``[b, n, 2]``. A missing
    image is one zero patch of a 1 x 1 grid (the tower's attention needs a real key), which
    the cross-attention mask keeps every token from seeing.

    Args:
        processed: ``pixel_values`` ``[N, P, c*p*p]``, ``pixel_attention_mask`` ``[N, P]``,
            ``spatial_shapes`` ``[N, 2]`` of the ``N`` images.
        counts: images of each sample (``sum(counts) == N``).
        n: the most images of a sample.
    """
    pixels = torch.as_tensor(processed["pixel_values"])
    real = torch.as_tensor(processed["pixel_attention_mask"])
    shapes = torch.as_tensor(processed["spatial_shapes"])
    b = len(counts)
    values = pixels.new_zeros(b, n, *pixels.shape[1:])  # [b, n, P, c*p*p]
    mask = real.new_zeros(b, n, real.shape[-1])
    mask[..., 0] = 1
    grids = shapes.new_ones(b, n, 2)
    start = 0
    for i, count in enumerate(counts):
        values[i, :count] = pixels[start:start + count]
        mask[i, :count] = real[start:start + count]
        grids[i, :count] = shapes[start:start + count]
        start += count
    if n == 1:
        values, mask, grids = values[:, 0], mask[:, 0], grids[:, 0]
    return {"pixel_values": values, "pixel_attention_mask": mask, "spatial_shapes": grids}


class FusedVisionTextProcessor(ProcessorMixin):
    """The fused tokenizer, the tower's image processor and the image token.

    Args:
        image_processor: the tower's own image processor (its source's
            ``preprocessor_config.json``).
        tokenizer: the decoder's tokenizer with the new tokens.
        chat_template: a template of messages whose content is a string; None uses the
            tokenizer's own (the decoder's), else a plain ``role: content`` one.
        image_token: the token that places an image.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None,
                 image_token: str = "<|image|>", **kwargs) -> None:
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer does not know the image token {image_token!r}")
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked out: any id will do
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, *, padding: bool | str = True,
                 padding_side: str = "left", return_tensors: str = "pt",
                 **kwargs) -> BatchFeature:
        """Model inputs of one text or a batch.

        Args:
            images: for one text: None, an image or a list of images; for a batch: a list
                with one such entry per text, or a flat list of images taken in order by the
                texts' image tokens. A text with images and no image token gets one image
                token per image in front of it (where chat templates put images).
            text: a string or a list of strings; the image token marks where images go.
            padding: as the tokenizer's (``True``: to the longest text).
            padding_side: ``left`` (what ``generate`` needs) or ``right``.
            return_tensors: ``pt``.
            **kwargs: passed to the tokenizer (``truncation``, ``max_length``, ...).

        Returns:
            ``input_ids`` and ``attention_mask`` ``[b, s]``; with images also
            ``pixel_values`` ``[b, n, c, h, w]`` (a sample with fewer images gets zero images
            nobody sees) and ``cross_attention_mask`` ``[b, s, n]`` (True = the token sees
            that image). A NaFlex image processor's (SigLIP2) patches instead: see
            :func:`naflex_batch`.

        Raises:
            ValueError: no text, or image tokens that do not match the images.
        """
        if text is None:
            raise ValueError("the processor needs text (with the image token where images go)")
        texts = [text] if isinstance(text, str) else list(text)
        per_sample = self._images_per_sample(images, texts)
        for i, sample in enumerate(per_sample):
            tokens = texts[i].count(self.image_token)
            if sample and tokens == 0:
                texts[i] = self.image_token * len(sample) + texts[i]
            elif tokens != len(sample):
                raise ValueError(f"text {i} has {tokens} {self.image_token} token(s) and "
                                 f"{len(sample)} image(s); give one image per image token")
        encoded = self.tokenizer(texts, padding=padding, padding_side=padding_side,
                                 return_tensors=return_tensors, **kwargs)
        data = dict(encoded)
        n = max(len(sample) for sample in per_sample)
        if n:
            flat = [image for sample in per_sample for image in sample]
            processed = self.image_processor(flat, return_tensors="pt")
            pixels = processed["pixel_values"]
            if "spatial_shapes" in processed:  # a NaFlex tower's patches
                data.update(naflex_batch(processed, [len(sample) for sample in per_sample], n))
            else:
                batched = pixels.new_zeros(len(texts), n, *pixels.shape[1:])  # [b, n, c, h, w]
                start = 0
                for i, sample in enumerate(per_sample):
                    batched[i, :len(sample)] = pixels[start:start + len(sample)]
                    start += len(sample)
                data["pixel_values"] = batched
            data["cross_attention_mask"] = image_token_mask(
                torch.as_tensor(data["input_ids"]), self.image_token_id, n)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _images_per_sample(self, images, texts: list[str]) -> list[list]:
        if images is None:
            return [[] for _ in texts]
        if not isinstance(images, list | tuple):
            images = [images]
        if len(texts) == 1 and not any(isinstance(x, list | tuple) for x in images):
            return [list(images)]
        if all(isinstance(x, list | tuple) or x is None for x in images):
            if len(images) != len(texts):
                raise ValueError(f"{len(texts)} texts and {len(images)} image lists: give one "
                                 "list of images per text")
            return [list(x or []) for x in images]
        counts = [t.count(self.image_token) for t in texts]
        if sum(counts) != len(images):
            if not any(counts) and len(images) == len(texts):
                return [[image] for image in images]
            raise ValueError(f"the texts have {sum(counts)} {self.image_token} token(s) and "
                             f"{len(images)} image(s) were given")
        out, start = [], 0
        for count in counts:
            out.append(list(images[start:start + count]))
            start += count
        return out

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """Render messages with the decoder's own chat template: a message whose content is a
        list of parts has its ``{"type": "image"}`` parts replaced by the image token and its
        text parts joined, in order, so the template sees plain strings.

        Args:
            conversation: a list of ``{"role", "content"}`` messages (or a batch of them).
            chat_template: a template to use instead.
            **kwargs: passed to the tokenizer's ``apply_chat_template`` (``tokenize``,
                ``add_generation_prompt``, ...).

        Returns:
            What the tokenizer's ``apply_chat_template`` returns (the prompt text by default).
        """
        batched = bool(conversation) and isinstance(conversation[0], list | tuple)
        conversations = conversation if batched else [conversation]
        flattened = [[self._flatten(message) for message in messages]
                     for messages in conversations]
        template = (chat_template or self.chat_template or self.tokenizer.chat_template
                    or DEFAULT_CHAT_TEMPLATE)
        kwargs.setdefault("tokenize", False)
        return self.tokenizer.apply_chat_template(
            flattened if batched else flattened[0], chat_template=template, **kwargs)

    def _flatten(self, message: dict) -> dict:
        content = message.get("content")
        if not isinstance(content, list | tuple):
            return dict(message)
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                parts.append(self.image_token)
            elif kind == "text":
                parts.append(part.get("text", ""))
            else:
                raise ValueError(f"unknown message part {part!r}: expected type image or text")
        return {**message, "content": "".join(parts)}

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "cross_attention_mask",
                "pixel_attention_mask", "spatial_shapes"]


# save_pretrained writes these files beside the weights (and auto_map), so a saved model
# loads with transformers alone as the export did
FusedVisionTextProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["FusedVisionTextProcessor"]
