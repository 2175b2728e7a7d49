"""Preprocessing that travels with every model: the same object decodes the training data and the images
(or strings) a stranger feeds a downloaded model.

An image model's :class:`Preprocessing` says how raw pixels become its input: RGB channel order, a square
resize to ``image_size`` with ``interpolation``, scaling to [0, 1], then ``(x - mean) / std`` per channel.
Its source (:func:`resolve_preprocessing`):

- a backbone trained from scratch (``pretrained`` false, no checkpoint): mean = std = 0.5, i.e. pixels in
  [-1, 1], what hf_lpft always used (so results stay comparable);
- a pretrained timm backbone (``pretrained`` true or a local checkpoint): the model's own ``pretrained_cfg``
  through ``timm.data.resolve_data_config`` (e.g. ImageNet mean/std, bicubic);
- a pretrained transformers vision backbone: its image processor (``AutoImageProcessor``) when the folder
  / id has one;
- a text backbone: its tokenizer (``AutoTokenizer`` of the backbone) with ``max_length``.

The input size is the training resolution (``data.image_size``), not the backbone's native one. Saved in
``config.json`` (``preprocessing``) and, for images, as a transformers ``preprocessor_config.json``
(``ViTImageProcessor`` keys), so ``AutoImageProcessor.from_pretrained(folder)`` reproduces it.
Personalized fine-tuning after FedAvg (arXiv 2511.12695, Section 3) changes weights, never the input pipeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from hf_lpft.spec import BackboneSpec

SCRATCH_MEAN = SCRATCH_STD = (0.5, 0.5, 0.5)
INTERPOLATIONS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
SOURCES = ("scratch", "timm_pretrained_cfg", "image_processor", "tokenizer")


@dataclass(frozen=True)
class Preprocessing:
    """How inputs become model inputs. ``kind`` is ``image`` or ``text``; text uses ``tokenizer``/``max_length``.

    ``source`` records where the values came from (:data:`SOURCES`).
    """

    kind: str = "image"
    image_size: int = 32
    mean: tuple[float, ...] = SCRATCH_MEAN
    std: tuple[float, ...] = SCRATCH_STD
    interpolation: str = "bicubic"
    channel_order: str = "RGB"
    source: str = "scratch"
    tokenizer: str | None = None
    max_length: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("image", "text"):
            raise ValueError(f"preprocessing kind={self.kind!r} is not allowed; choose 'image' or 'text'")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r} is not allowed; choose one of "
                             f"{list(INTERPOLATIONS)}")
        if self.source not in SOURCES:
            raise ValueError(f"preprocessing source={self.source!r} is not allowed; choose one of {list(SOURCES)}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict:
        return asdict(self) | {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict | None, **defaults: Any) -> Preprocessing:
        """From :meth:`to_dict` output; None (a model saved before preprocessing was recorded) = ``defaults``."""
        return cls(**(values if values is not None else defaults))

    def pil(self, image) -> Any:
        """A PIL image (any mode and size) as RGB, resized to ``image_size`` square with ``interpolation``."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        image = image.convert("RGB")
        size = (self.image_size, self.image_size)
        return image if image.size == size else image.resize(size, resample=INTERPOLATIONS[self.interpolation])

    def to_uint8(self, images) -> torch.Tensor:
        """PIL images / HWC uint8 arrays -> a uint8 NCHW tensor (what the data pipeline stores)."""
        images = images if isinstance(images, (list, tuple)) else [images]
        out = np.stack([np.asarray(self.pil(im), dtype=np.uint8) for im in images])
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW pixels -> float32 ``(x / 255 - mean) / std`` per channel."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def __call__(self, inputs, *, tokenizer=None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Model inputs for PIL image(s) / uint8 arrays (a float NCHW tensor) or string(s) (token ids and mask);
        ``tokenizer``: the one to use for text (default: :meth:`load_tokenizer`, the backbone's)."""
        if self.kind == "text":
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            encoded = (tokenizer or self.load_tokenizer())(texts, truncation=True, max_length=self.max_length,
                                                            padding=True, return_tensors="pt")
            return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        return self.normalize(self.to_uint8(inputs))

    def load_tokenizer(self):
        from hf_lpft.data.sources import load_tokenizer

        return load_tokenizer(self.tokenizer)

    def image_processor_dict(self) -> dict:
        """The same preprocessing as a transformers ``preprocessor_config.json`` (ViTImageProcessor keys)."""
        return {"image_processor_type": "ViTImageProcessor", "do_convert_rgb": True, "do_resize": True,
                "size": {"height": self.image_size, "width": self.image_size},
                "resample": INTERPOLATIONS[self.interpolation], "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": list(self.mean), "image_std": list(self.std)}


def timm_preprocessing(name: str, *, image_size: int) -> Preprocessing:
    """A pretrained timm model's own mean / std / interpolation (``resolve_data_config`` of its pretrained_cfg)."""
    import timm
    import timm.data

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"timm model {name!r} has no pretrained_cfg; cannot tell its normalization")
    data = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    interpolation = data.get("interpolation") or "bicubic"
    return Preprocessing(image_size=image_size, mean=data["mean"], std=data["std"],
                         interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
                         source="timm_pretrained_cfg", extra={"timm_input_size": list(data["input_size"]),
                                                              "crop_pct": data.get("crop_pct")})


def hf_image_preprocessing(source: str, *, image_size: int) -> Preprocessing | None:
    """A transformers model's image processor (mean / std / resample), or None when it has none."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError):
        return None
    resample = getattr(processor, "resample", 3)
    names = {v: k for k, v in INTERPOLATIONS.items()}
    return Preprocessing(image_size=image_size, mean=processor.image_mean, std=processor.image_std,
                         interpolation=names.get(int(resample), "bicubic"), source="image_processor")


def resolve_preprocessing(backbone: str | BackboneSpec, *, image_size: int, pretrained: bool = False,
                          checkpoint: str | None = None, is_text: bool = False,
                          max_length: int | None = None) -> Preprocessing:
    """The preprocessing of a backbone as hf_lpft builds it (see the module docstring for the rules)."""
    spec = BackboneSpec.parse(backbone)
    prefix, name = spec.kind, spec.name
    if is_text:
        return Preprocessing(kind="text", image_size=image_size, source="tokenizer", tokenizer=str(spec),
                             max_length=max_length)
    if prefix == "timm" and (pretrained or checkpoint is not None):
        return timm_preprocessing(name, image_size=image_size)
    if prefix == "hf" and pretrained:
        from hf_lpft.data.sources import resolve_hf_source

        found = hf_image_preprocessing(resolve_hf_source(name), image_size=image_size)
        if found is not None:
            return found
    return Preprocessing(image_size=image_size)


def preprocessing_for(cfg) -> Preprocessing:
    """The preprocessing an experiment's models carry and its data pipeline uses (``cfg``: an ExperimentConfig):
    from scratch [-1, 1], a pretrained timm backbone its own pretrained_cfg, text the backbone's tokenizer."""
    return resolve_preprocessing(cfg.model.spec, image_size=cfg.data.image_size, pretrained=cfg.model.pretrained,
                                 checkpoint=cfg.model.checkpoint, is_text=bool(cfg.data.text_column),
                                 max_length=cfg.data.max_seq_len)
