"""Run transformers' PyTorch model of a checkpoint (the class its config.json names: Qwen2-VL,
Qwen2.5-VL) and build the matching `ModelInputs` by hand, so model parity tests depend on nothing
of ours but the model."""

from dataclasses import dataclass

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_position_ids

# A segment is text, or an int i meaning "image i" (expanded to its tokens, optionally wrapped).
Segment = str | int


@dataclass
class Reference:
    """One batch both ways: transformers' kwargs and our ModelInputs, plus the reference output."""

    hf_inputs: dict[str, torch.Tensor]
    ours: dict[str, np.ndarray]
    mask: np.ndarray


class HFReference:
    def __init__(self, checkpoint_dir: str, dtype: str | None = None):
        """`dtype`: load as this torch dtype (default: as stored)."""
        architecture = transformers.AutoConfig.from_pretrained(checkpoint_dir).architectures[0]
        options = {} if dtype is None else {"dtype": dtype}
        self.model = getattr(transformers, architecture).from_pretrained(checkpoint_dir, **options).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(checkpoint_dir)
        self.config = self.model.config

    def build(self, sequences: list[list[Segment]], images: list[np.ndarray], *, left_pad: bool = False, extra_pad: int = 3, rows: str = "packed") -> Reference:
        """Token ids with each image's pads, padded to a common length; vision patches either all
        packed into one row (`packed`) or one image per row (`per_image`)."""
        image_id = self.config.image_token_id
        # Images enter the model in order of appearance; an image used twice is processed twice.
        order = [seg for seq in sequences for seg in seq if isinstance(seg, int)]
        processed = self.image_processor(images=[images[i] for i in order], return_tensors="pt") if order else None
        grids = processed["image_grid_thw"] if processed is not None else None
        tokens = iter([int(g.prod()) // 4 for g in grids] if grids is not None else [])
        ids = []
        for seq in sequences:
            row = []
            for seg in seq:
                row += [image_id] * next(tokens) if isinstance(seg, int) else self.tokenizer(seg, add_special_tokens=False)["input_ids"]
            ids.append(row)
        length = max(map(len, ids)) + extra_pad
        input_ids = np.full((len(ids), length), self.tokenizer.pad_token_id, np.int64)
        mask = np.zeros_like(input_ids)
        for i, row in enumerate(ids):
            span = slice(length - len(row), length) if left_pad else slice(0, len(row))
            input_ids[i, span], mask[i, span] = row, 1
        mm = (input_ids == image_id).astype(np.int64)
        hf_inputs = dict(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask), mm_token_type_ids=torch.tensor(mm))
        index = np.full(input_ids.shape, -1, np.int32)
        flat = np.flatnonzero(input_ids == image_id)
        index.reshape(-1)[flat] = np.arange(len(flat))
        ours = dict(input_ids=input_ids.astype(np.int32), attention_mask=mask.astype(np.int32), image_token_index=index)
        if processed is not None:
            hf_inputs.update(pixel_values=processed["pixel_values"], image_grid_thw=grids)
            vision, merged_rows = _vision_rows(processed["pixel_values"].numpy(), grids, rows)
            ours.update(vision)
            index[index >= 0] = merged_rows[index[index >= 0]]
        positions, _ = self.model.model.get_rope_index(
            hf_inputs["input_ids"], mm_token_type_ids=hf_inputs["mm_token_type_ids"], image_grid_thw=grids, attention_mask=hf_inputs["attention_mask"]
        )
        ours["position_ids"] = positions.numpy().astype(np.int32)
        return Reference(hf_inputs, ours, mask.astype(bool))

    def hidden_states(self, ref: Reference, **overrides: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.model.model(**{**ref.hf_inputs, **overrides}).last_hidden_state.numpy()


def _vision_rows(pixel_values: np.ndarray, grids: torch.Tensor, rows: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Vision inputs in the requested packing, and where each merged token (in image order) lands."""
    positions = get_vision_position_ids(grids, 2).numpy().astype(np.int32)
    sizes = [int(g.prod()) for g in grids]
    if rows == "packed":
        segments = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(sizes)])
        vision = dict(pixel_values=pixel_values[None], patch_positions=positions[None], patch_segment_ids=segments[None])
        return vision, np.arange(sum(sizes) // 4)
    width = max(sizes)
    out = dict(
        pixel_values=np.zeros((len(sizes), width, pixel_values.shape[1]), np.float32),
        patch_positions=np.zeros((len(sizes), width, 2), np.int32),
        patch_segment_ids=np.zeros((len(sizes), width), np.int32),
    )
    start = 0
    for i, n in enumerate(sizes):
        out["pixel_values"][i, :n] = pixel_values[start : start + n]
        out["patch_positions"][i, :n] = positions[start : start + n]
        out["patch_segment_ids"][i, :n] = 1
        start += n
    return out, np.concatenate([i * (width // 4) + np.arange(n // 4) for i, n in enumerate(sizes)])


def hf_embedding(hf: HFReference, text: str, images: list[np.ndarray]) -> np.ndarray:
    """transformers' own path for one item: tokenizer, image processor, each `<|image_pad|>`
    repeated per merged token, M-RoPE from `mm_token_type_ids`, last token, L2 norm."""
    image_id = hf.config.image_token_id
    ids = hf.tokenizer(text, add_special_tokens=False)["input_ids"]
    kwargs = {}
    if images:
        processed = hf.image_processor(images=images, return_tensors="pt")
        counts = iter(int(g.prod()) // 4 for g in processed["image_grid_thw"])
        ids = [t for i in ids for t in ([i] * next(counts) if i == image_id else [i])]
        kwargs = dict(pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"])
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        hidden = hf.model.model(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=(input_ids == image_id).long(), **kwargs
        ).last_hidden_state
    return torch.nn.functional.normalize(hidden[0, -1], dim=-1).numpy()
