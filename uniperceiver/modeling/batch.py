"""What the model consumes: sequences of modality segments, and task batches built from them.

One encoder call encodes one `Sequence`: `[SPE] + segment_1 + segment_2 ...`, every sample of
the batch having the same segment layout (segments are padded per batch, so segment boundaries
are shared). Routing context (attribute rows, task ids) travels inside the sequence.

Shape legend: B batch, L length of a text segment, T frames, C channels, H/W pixels, S segments,
A attribute width, N candidates of a target set.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

Modality = Literal["image", "video", "text"]
MODALITY_IDS = {"image": 0, "video": 0, "text": 1}  # video is encoded exactly like image


@dataclass
class Segment:
    """One modality segment of a batch of sequences.

    image/video: `data` is float [B, T, C, H, W] (an image is a 1-frame video; [B, C, H, W] is
    accepted). text: `data` is long ids [B, L], `padding_mask` [B, L] (True = padding) and
    `positions` [L] or [B, L] (default 0..L-1, restarting in every text segment).
    """

    modality: Modality
    data: Tensor
    padding_mask: Tensor | None = None
    positions: Tensor | None = None

    def __post_init__(self) -> None:
        if self.modality == "text":
            if self.data.dim() != 2 or self.data.dtype != torch.long:
                raise ValueError(
                    f"text segment needs long ids [B, L], got {tuple(self.data.shape)} {self.data.dtype}"
                )
            if self.padding_mask is not None and self.padding_mask.shape != self.data.shape:
                raise ValueError(
                    f"text padding_mask {tuple(self.padding_mask.shape)} != ids {tuple(self.data.shape)}"
                )
        elif self.modality in ("image", "video"):
            if self.data.dim() == 4:
                self.data = self.data.unsqueeze(1)
            if self.data.dim() != 5:
                raise ValueError(
                    f"{self.modality} segment needs [B, T, C, H, W] pixels, got {tuple(self.data.shape)}"
                )
        else:
            raise ValueError(f"unknown modality {self.modality!r}; expected image, video or text")

    @property
    def batch_size(self) -> int:
        return self.data.shape[0]

    def to(self, device: torch.device | str) -> Segment:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, data=self.data.to(device), padding_mask=move(self.padding_mask),
                       positions=move(self.positions))


@dataclass
class Sequence:
    """A batch of `[SPE] + segments` sequences and how to route them.

    `attributes_SA` holds one attribute row per segment (the attribute router); `task_id` feeds
    the task router; modality ids per segment are derived. `caption_queries=True` marks caption
    training: the last text segment is `[words ; spe-queries]` of equal halves and the encoder
    uses the structured caption mask. `role` is the release's data_type: "target" for candidate
    sequences (target sets, retrieval captions), which picks the target deep prompts.
    """

    segments: list[Segment]
    attributes_SA: Tensor | None = None
    task_id: int = 0
    caption_queries: bool = False
    role: Literal["input", "target"] = "input"

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a sequence needs at least one segment")
        sizes = {s.batch_size for s in self.segments}
        if len(sizes) != 1:
            raise ValueError(f"segments disagree on batch size: {sorted(sizes)}")
        if self.attributes_SA is not None and self.attributes_SA.shape[0] not in (1, len(self.segments)):
            raise ValueError(
                f"{self.attributes_SA.shape[0]} attribute rows for {len(self.segments)} segments"
            )
        if self.role not in ("input", "target"):
            raise ValueError(f"sequence role must be 'input' or 'target', got {self.role!r}")
        if self.caption_queries and (self.segments[-1].modality != "text"
                                     or self.segments[-1].data.shape[1] % 2):
            raise ValueError("caption_queries needs a last text segment of even length [words ; queries]")

    @property
    def batch_size(self) -> int:
        return self.segments[0].batch_size

    @property
    def modality_ids_S(self) -> Tensor:
        return torch.tensor([MODALITY_IDS[s.modality] for s in self.segments])

    def to(self, device: torch.device | str) -> Sequence:
        return replace(
            self,
            segments=[s.to(device) for s in self.segments],
            attributes_SA=None if self.attributes_SA is None else self.attributes_SA.to(device),
        )


@dataclass
class TargetSet:
    """A shared candidate set (class names, the vocabulary, verbalisers): N text sequences
    `[SPE] + ids`, all routed with one attribute row."""

    name: str
    ids_NL: Tensor
    padding_mask_NL: Tensor | None
    attributes_SA: Tensor | None = None
    task_id: int = 0
    # A vocabulary subset: the token id of each row (None = row v is token v).
    token_ids_N: Tensor | None = None

    def rows_of(self, token_ids: Tensor) -> Tensor:
        """Row index of each token id (-1 stays -1): vocabulary labels -> candidate indices."""
        if self.token_ids_N is None:
            return token_ids
        lut = torch.full((int(self.token_ids_N.max()) + 2,), -2, dtype=torch.long, device=token_ids.device)
        lut[self.token_ids_N.to(token_ids.device)] = torch.arange(len(self), device=token_ids.device)
        rows = torch.where(token_ids >= 0, lut[token_ids.clamp(0, lut.shape[0] - 1)], token_ids)
        bad = (token_ids >= 0) & ((token_ids >= lut.shape[0] - 1) | (rows == -2))
        if bool(bad.any()):
            missing = sorted(set(token_ids[bad].tolist()))[:10]
            raise ValueError(f"target set {self.name!r} (a vocabulary subset) lacks token ids {missing}")
        return rows

    def __len__(self) -> int:
        return self.ids_NL.shape[0]

    def to(self, device: torch.device | str) -> TargetSet:
        return replace(
            self,
            ids_NL=self.ids_NL.to(device),
            padding_mask_NL=None if self.padding_mask_NL is None else self.padding_mask_NL.to(device),
            attributes_SA=None if self.attributes_SA is None else self.attributes_SA.to(device),
            token_ids_N=None if self.token_ids_N is None else self.token_ids_N.to(device),
        )

    def slice(self, start: int, stop: int) -> Sequence:  # noqa: A003
        mask = None if self.padding_mask_NL is None else self.padding_mask_NL[start:stop]
        return Sequence(
            [Segment("text", self.ids_NL[start:stop], mask)],
            attributes_SA=self.attributes_SA,
            task_id=self.task_id,
            role="target",
        )


@dataclass
class TaskBatch:
    """One unmixed batch of a task. `kind` is the formulation of its task type (its `TaskSpec.kind`
    in `uniperceiver.tasks`, e.g. classification, retrieval, mlm, caption, text_classification).

    classification / text_classification: `labels` [B] index the `target_set`; text
      classification also gives `spe_index` [B], the position of `<|spe|>` inside the text.
    retrieval: `targets` holds one caption sequence per input (row i matches input i), or in
      evaluation several per input with `target_owner` [N] giving the input index of each.
    mlm: `labels` [B, L] over the vocabulary, -1 where not masked.
    caption: `labels` [B, L] words to predict at each query position, -1 at padding. For
      generation `inputs` holds only the visual segment and `decode_attributes_SA` the row that
      routes the generated text.
    """

    task: str
    kind: str
    temperature: str
    inputs: Sequence
    labels: Tensor | None = None
    targets: Sequence | None = None
    target_owner: Tensor | None = None
    target_set: str | None = None
    spe_index: Tensor | None = None
    decode_attributes_SA: Tensor | None = None
    loss_weight: float = 1.0
    label_smoothing: float = 0.0
    meta: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> TaskBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            inputs=self.inputs.to(device),
            targets=None if self.targets is None else self.targets.to(device),
            labels=move(self.labels),
            target_owner=move(self.target_owner),
            spe_index=move(self.spe_index),
            decode_attributes_SA=move(self.decode_attributes_SA),
        )

    def with_vocabulary_rows(self, target_set: TargetSet) -> TaskBatch:
        """MLM/caption labels are token ids; against a vocabulary subset they become row indices."""
        from ..utils.task_registry import kind_spec

        if target_set.token_ids_N is None or self.labels is None or not kind_spec(self.kind).token_labels:
            return self
        return replace(self, labels=target_set.rows_of(self.labels))
