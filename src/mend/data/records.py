"""The one record type every dataset loader yields."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Probe:
    """A (prompt, answer) pair measured after an edit (locality or portability)."""

    prompt: str
    answer: str
    kind: str = ""  # e.g. "Relation_Specificity", "Reasoning"


@dataclass(frozen=True)
class EditRecord:
    """One fact edit with its evaluation probes.

    Attributes:
        case_id: identifier within its source (file index when the source has none).
        prompt: the edit prompt; the edit makes the model continue it with ``target``.
        target: the new answer.
        ground_truth: the answer before the edit, when known.
        subject: the entity the fact is about, when known.
        rephrases: paraphrases of ``prompt`` (equivalence / generality examples), answer ``target``.
        locality: unrelated (prompt, answer) probes whose predictions must not change.
        portability: probes whose answer should follow from the edit (KnowEdit).
    """

    case_id: str
    prompt: str
    target: str
    ground_truth: str = ""
    subject: str = ""
    rephrases: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = field(default_factory=tuple)

    @property
    def equivalents(self) -> tuple[str, ...]:
        """The prompts that should give ``target`` after the edit: the paraphrases, or the edit
        prompt itself when the record has none."""
        return self.rephrases or (self.prompt,)
