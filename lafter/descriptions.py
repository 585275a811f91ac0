"""Stage 0 of LaFTer: the text the classifier is trained on.

Every class gets sentences labelled with its index: language-model answers to a few questions
about the class (the paper's main source), hand-made prompt templates (always added: they anchor
the classifier to the class name the way zero-shot CLIP sees it), or the user's own sentences.
Templates alone must work, because an offline deployment has no language model.

Templates and questions are written with ``{}`` for the class (and ``{domain}`` for the target
domain). The article in front of a placeholder is chosen from the first letter of what replaces it
("a {}" -> "an apple"); every other article is kept as written, which is why the reference's
"a origami {}." stays ungrammatical: it is the reference text, and results are compared with it.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from lafter.errors import Cancelled, ClassNamesError, DescriptionError, InvalidInputError, LLMError
from lafter.llm import DescriptionCache, LLMClient
from lafter.progress import CancelCheck, ProgressCallback, ProgressEvent, check_cancel
from lafter.templates import CIFAR_TEMPLATES, DOMAIN_TEMPLATES, IMAGENET_TEMPLATES

logger = logging.getLogger(__name__)

STAGE = "describing"

Source = Literal["auto", "llm", "templates", "provided"]
TemplateSet = Literal["imagenet", "cifar", "all"]
OnLLMFailure = Literal["fail", "templates"]

# The paper's five questions (method.md, stage 0).
QUESTIONS: tuple[str, ...] = (
    "Describe what a {} looks like",
    "How can you identify a {}?",
    "What does a {} look like?",
    "Describe an image from the internet of a {}",
    "A caption of an image of a {}:",
)

# The targeted variant (TAP): the same questions, asked about the user's domain.
DOMAIN_QUESTIONS: tuple[str, ...] = (
    "Describe what a {domain} of a {} looks like",
    "How can you identify a {} in a {domain}?",
    "What does a {} look like in a {domain}?",
    "Describe a {domain} of a {} from the internet",
    "A caption of a {domain} of a {}:",
)

_CLASS = "{}"
_DOMAIN = "{domain}"
_VOWELS = frozenset("aeiou")


# --------------------------------------------------------------------------------------------------
# filling templates


def class_text(name: str) -> str:
    """How a class name appears in text: underscores (dataset folder names) become spaces."""
    return " ".join(name.replace("_", " ").split())


def article_for(word: str) -> str:
    """Choose "a" or "an" by the first letter, as the reference does (so "an unicorn", "a hour": simple
    and reproducible rather than phonetically right)."""
    return "an" if word[:1].lower() in _VOWELS else "a"


def _fill(template: str, placeholder: str, value: str) -> str:
    article = re.compile(r"\b([Aa])n? " + re.escape(placeholder))

    def with_article(match: re.Match[str]) -> str:
        chosen = article_for(value)
        if match.group(1) == "A":
            chosen = chosen.capitalize()
        return f"{chosen} {value}"

    return article.sub(with_article, template).replace(placeholder, value)


def fill(template: str, class_name: str, domain: str | None = None) -> str:
    """One template or question for one class (and domain), with the articles fixed."""
    text = template
    if domain is not None:
        text = _fill(text, _DOMAIN, " ".join(domain.split()))
    return _fill(text, _CLASS, class_text(class_name))


def templates_for(template_set: TemplateSet = "imagenet", domain: str | None = None) -> tuple[str, ...]:
    """The unfilled templates a configuration uses (the domain set overrides ``template_set``)."""
    if domain is not None:
        return DOMAIN_TEMPLATES
    if template_set == "imagenet":
        return IMAGENET_TEMPLATES
    if template_set == "cifar":
        return CIFAR_TEMPLATES
    return tuple(dict.fromkeys(IMAGENET_TEMPLATES + CIFAR_TEMPLATES))


def questions_for(domain: str | None = None) -> tuple[str, ...]:
    return DOMAIN_QUESTIONS if domain is not None else QUESTIONS


def template_sentences(
    class_name: str, template_set: TemplateSet = "imagenet", domain: str | None = None
) -> list[str]:
    return [fill(t, class_name, domain) for t in templates_for(template_set, domain)]


def question_prompts(class_name: str, domain: str | None = None) -> list[str]:
    return [fill(q, class_name, domain) for q in questions_for(domain)]


# --------------------------------------------------------------------------------------------------
# configuration and result


@dataclass
class DescriptionConfig:
    """How to build the sentences.

    ``source="auto"`` uses the language model when one is configured and templates otherwise, so
    the same job definition runs online and offline. ``per_class`` is answers per question (the
    paper: 10 x 5 questions = 50 per class). ``on_llm_failure="templates"`` trades some accuracy for
    a job that still finishes when the model server is down; the result says so in ``warnings``.
    """

    source: Source = "auto"
    per_class: int = 10
    domain: str | None = None
    provided: dict[str, list[str]] | None = None
    template_set: TemplateSet = "imagenet"
    on_llm_failure: OnLLMFailure = "templates"

    def __post_init__(self) -> None:
        problems = []
        for name, value, allowed in (
            ("source", self.source, get_args(Source)),
            ("template_set", self.template_set, get_args(TemplateSet)),
            ("on_llm_failure", self.on_llm_failure, get_args(OnLLMFailure)),
        ):
            if value not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if isinstance(self.per_class, bool) or not isinstance(self.per_class, int) or self.per_class < 1:
            problems.append(f"per_class must be an integer >= 1, got {self.per_class!r}")
        if self.domain is not None:
            if not isinstance(self.domain, str) or not self.domain.strip():
                problems.append("domain must be a non-empty string or None")
            else:
                self.domain = " ".join(self.domain.split())
        if self.source == "provided" and self.provided is None:
            problems.append("source='provided' needs the sentences in `provided`")
        if problems:
            raise InvalidInputError("invalid description configuration: " + "; ".join(problems))


@dataclass
class Descriptions:
    """The stage-0 output: ``sentences[i]`` describes ``class_names[labels[i]]``.

    ``source_used`` is what actually produced the non-template sentences ("llm", "provided") or
    "templates" when only templates were used, e.g. after a language-model failure; ``warnings``
    explains anything a user should know about the quality of the text.
    """

    sentences: list[str]
    labels: list[int]
    class_names: list[str]
    source_used: str
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.sentences) != len(self.labels):
            raise InvalidInputError(
                f"descriptions have {len(self.sentences)} sentences but {len(self.labels)} labels"
            )
        bad = [label for label in self.labels if not 0 <= label < len(self.class_names)]
        if bad:
            raise InvalidInputError(
                f"description labels out of range for {len(self.class_names)} classes: "
                f"{sorted(set(bad))[:10]}"
            )

    def __len__(self) -> int:
        return len(self.sentences)

    def by_class(self) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {name: [] for name in self.class_names}
        for sentence, label in zip(self.sentences, self.labels, strict=True):
            grouped[self.class_names[label]].append(sentence)
        return grouped

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "class_names": list(self.class_names),
            "source_used": self.source_used,
            "warnings": list(self.warnings),
            "sentences": list(self.sentences),
            "labels": list(self.labels),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Descriptions:
        try:
            return cls(
                sentences=[str(s) for s in data["sentences"]],
                labels=[int(label) for label in data["labels"]],
                class_names=[str(c) for c in data["class_names"]],
                source_used=str(data["source_used"]),
                warnings=[str(w) for w in data.get("warnings", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"not a descriptions document: {exc!r}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Descriptions:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidInputError(f"descriptions JSON does not parse: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidInputError("descriptions JSON must be an object")
        return cls.from_dict(data)


# --------------------------------------------------------------------------------------------------
# validation


# Characters Unicode files as letters or symbols that render as nothing (Hangul fillers, the blank
# Braille pattern): a name made of them is as invisible as an empty one.
_BLANK = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _invisible(ch: str) -> bool:
    """Format characters (Cf: zero-width spaces and joiners, bidi marks, soft hyphens) and control
    characters other than whitespace: nothing a reader sees, so nothing that tells classes apart."""
    category = unicodedata.category(ch)
    return category == "Cf" or (category == "Cc" and not ch.isspace())


def normalize_class_name(name: str) -> str:
    """A class name as it is stored and compared: NFKC (full-width and other compatibility forms
    become the plain ones, "\uff43\uff41\uff54" -> "cat"), invisible characters removed, surrounding
    whitespace trimmed. "" when nothing visible is left (spaces, combining marks, fillers only), so
    such a name is refused as empty. The one place these rules live (the service uses them too)."""
    text = unicodedata.normalize("NFKC", name)
    text = unicodedata.normalize("NFKC", "".join(ch for ch in text if not _invisible(ch))).strip()
    visible = any(unicodedata.category(ch)[0] in "LNPS" and ch not in _BLANK for ch in text)
    return text if visible else ""


def class_key(name: str) -> str:
    """Two class names are the same class when their keys are equal: the same once normalised
    (``normalize_class_name``) and read in a sentence (``class_text``: underscores and runs of
    whitespace as one space), ignoring case."""
    return class_text(normalize_class_name(name)).casefold()


def validate_class_names(
    class_names: Sequence[str], *, max_length: int | None = None, max_classes: int | None = None
) -> list[str]:
    """Normalised names (``normalize_class_name``); refuses empty or invisible names, names longer
    than ``max_length``, duplicates (``class_key``), fewer than two classes and more than
    ``max_classes``, because each breaks training in a way that is much harder to understand later
    (a class that can never win, two heads fighting over identical text, a one-way softmax). Raises
    ``ClassNamesError`` naming the rule (its ``code``) and the first name that breaks it (``field``)."""
    if isinstance(class_names, str):
        raise ClassNamesError(
            "class_names must be a list of names, not a single string", code="class_names_invalid"
        )
    for i, name in enumerate(class_names):
        if not isinstance(name, str):
            raise ClassNamesError(
                f"class names must be strings; position {i} is not",
                code="class_names_invalid",
                field=f"class_names.{i}",
            )
    names = [normalize_class_name(name) for name in class_names]
    for i, name in enumerate(names):
        if not class_text(name):
            raise ClassNamesError(
                f"class names must not be empty or invisible; the name at position {i} is",
                code="class_name_empty",
                field=f"class_names.{i}",
            )
        if max_length is not None and len(name) > max_length:
            raise ClassNamesError(
                f"class name at position {i} is longer than {max_length} characters",
                code="class_name_too_long",
                field=f"class_names.{i}",
            )
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        key = class_key(name)
        if key in seen:
            raise ClassNamesError(
                f"class names must be unique: {class_names[seen[key]]!r} (position {seen[key]}) and "
                f"{class_names[i]!r} (position {i}) are the same class (case, spaces, underscores, "
                "invisible characters and full-width forms are ignored)",
                code="class_names_duplicate",
                field=f"class_names.{i}",
            )
        seen[key] = i
    if len(names) < 2:
        raise ClassNamesError(f"need at least 2 class names, got {len(names)}", code="class_names_too_few")
    if max_classes is not None and len(names) > max_classes:
        raise ClassNamesError(f"at most {max_classes} classes, got {len(names)}", code="class_names_too_many")
    return names


def _validate_provided(provided: Mapping[str, Any], names: list[str]) -> list[list[str]]:
    if not isinstance(provided, Mapping):
        raise InvalidInputError("provided sentences must be a mapping of class name -> list of sentences")
    index = {class_key(name): i for i, name in enumerate(names)}
    per_class: list[list[str]] = [[] for _ in names]
    unknown: list[str] = []
    for key, sentences in provided.items():
        position = index.get(class_key(key)) if isinstance(key, str) else None
        if position is None:
            unknown.append(repr(key))
            continue
        if isinstance(sentences, str) or not isinstance(sentences, Sequence):
            raise InvalidInputError(f"provided sentences for class {key!r} must be a list of strings")
        for sentence in sentences:
            if not isinstance(sentence, str):
                raise InvalidInputError(f"provided sentences for class {key!r} must be strings")
            text = " ".join(sentence.split())
            if text:
                per_class[position].append(text)
    if unknown:
        raise InvalidInputError(f"provided sentences name unknown classes: {', '.join(unknown[:20])}")
    missing = [names[i] for i, sentences in enumerate(per_class) if not sentences]
    if missing:
        raise InvalidInputError(
            "every class needs at least one non-empty provided sentence; missing for: "
            + ", ".join(repr(m) for m in missing[:20])
        )
    return per_class


# --------------------------------------------------------------------------------------------------
# generation


class _Reporter:
    """Progress with a bounded number of events (about 100 per pass), since a callback may write to
    a database and ImageNet has 1,000 classes. Steps never go backwards, so a fallback pass after
    a failed LLM pass does not make a progress bar jump back; the final event always comes once."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.stride = max(1, total // 100)
        self.last = 0

    def report(self, step: int) -> None:
        if self.callback is None or step >= self.total or step - self.last < self.stride:
            return
        self.last = step
        self.callback(ProgressEvent(STAGE, step, self.total))

    def finish(self, message: str, metrics: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback(ProgressEvent(STAGE, self.total, self.total, metrics, message))


def _dedupe(sentences: list[str]) -> list[str]:
    seen: set[str] = set()
    kept: list[str] = []
    for sentence in sentences:
        key = " ".join(sentence.split()).casefold()
        if key not in seen:
            seen.add(key)
            kept.append(sentence)
    return kept


def _ask_llm(
    llm: LLMClient,
    names: list[str],
    config: DescriptionConfig,
    cache: DescriptionCache | None,
    reporter: _Reporter,
    should_cancel: CancelCheck | None,
) -> list[list[str]]:
    """All class x question prompts in one concurrent batch (five questions alone would leave most
    of the concurrency idle), regrouped per class."""
    per_class_prompts = [question_prompts(name, config.domain) for name in names]
    prompts = [prompt for group in per_class_prompts for prompt in group]
    owner = [c for c, group in enumerate(per_class_prompts) for _ in group]
    remaining = [len(group) for group in per_class_prompts]
    classes_done = 0

    def on_result(index: int, _answers: list[str]) -> None:
        nonlocal classes_done
        remaining[owner[index]] -= 1
        if remaining[owner[index]] == 0:
            classes_done += 1
            reporter.report(classes_done)
            check_cancel(should_cancel, STAGE, classes_done)

    try:
        answers = llm.complete_many(
            prompts, config.per_class, cache=cache, on_result=on_result, should_cancel=should_cancel
        )
    except Cancelled as exc:
        if exc.stage == STAGE:
            raise
        raise Cancelled(
            f"cancelled during {STAGE} after {classes_done} classes", stage=STAGE, step=classes_done
        ) from exc
    grouped: list[list[str]] = [[] for _ in names]
    for index, class_answers in enumerate(answers):
        grouped[owner[index]].extend(class_answers)
    return grouped


def _assemble(
    names: list[str],
    extra: list[list[str]],
    templates: list[list[str]],
    source_used: str,
    warnings: list[str],
    reporter: _Reporter,
    should_cancel: CancelCheck | None,
) -> Descriptions:
    sentences: list[str] = []
    labels: list[int] = []
    for label, (own, fixed) in enumerate(zip(extra, templates, strict=True)):
        check_cancel(should_cancel, STAGE, label)
        kept = _dedupe(own + fixed)
        sentences.extend(kept)
        labels.extend([label] * len(kept))
        reporter.report(label + 1)
    reporter.finish(
        f"{len(sentences)} sentences for {len(names)} classes (source: {source_used})",
        {"sentences": len(sentences)},
    )
    return Descriptions(sentences, labels, list(names), source_used, warnings)


def generate_descriptions(
    class_names: Sequence[str],
    config: DescriptionConfig | None = None,
    llm: LLMClient | None = None,
    cache: DescriptionCache | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> Descriptions:
    """Stage 0: sentences and labels for ``class_names``.

    - ``templates``: templates only (the offline path).
    - ``llm``: language-model answers for every class x question plus the templates; needs a
      configured ``llm``. On failure, ``config.on_llm_failure`` decides between raising
      ``LLMError`` and a templates-only result with a warning.
    - ``auto``: ``llm`` when a configured client is given, else ``templates``.
    - ``provided``: the user's sentences plus the templates.

    ``cache`` (looked up by ``lafter.llm.cache_key``) makes a rerun with the same classes and model
    settings free. Raises ``InvalidInputError`` for bad class names or provided sentences, and
    ``Cancelled`` when ``should_cancel`` says so.
    """
    config = config if config is not None else DescriptionConfig()
    names = validate_class_names(class_names)
    reporter = _Reporter(progress, len(names))
    templates = [template_sentences(name, config.template_set, config.domain) for name in names]
    warnings: list[str] = []
    no_extra: list[list[str]] = [[] for _ in names]
    if config.provided and config.source != "provided":
        # Not an error: job definitions often carry every field; but the user should know.
        warnings.append(
            f"provided sentences were ignored because the description source is {config.source!r}"
        )

    def finish(extra: list[list[str]], source_used: str) -> Descriptions:
        return _assemble(names, extra, templates, source_used, warnings, reporter, should_cancel)

    if config.source == "templates":
        return finish(no_extra, "templates")
    if config.source == "provided":
        assert config.provided is not None  # guaranteed by DescriptionConfig
        return finish(_validate_provided(config.provided, names), "provided")

    llm_ready = llm is not None and llm.config.configured
    if config.source == "llm" and not llm_ready:
        raise DescriptionError(
            "source='llm' needs a configured language model: pass an LLMClient whose LLMConfig has a "
            "base_url (OpenAI-compatible server) or an api_key"
        )
    if not llm_ready:
        warnings.append(
            "no language model configured: descriptions come from templates only, which usually "
            "adapts less well than LLM descriptions"
        )
        return finish(no_extra, "templates")

    assert llm is not None
    check_cancel(should_cancel, STAGE, 0)
    try:
        answers = _ask_llm(llm, names, config, cache, reporter, should_cancel)
    except LLMError as exc:
        if config.on_llm_failure == "fail":
            raise
        message = f"language model failed, descriptions fell back to templates only: {exc}"
        logger.warning("%s", message)
        warnings.append(message)
        return finish(no_extra, "templates")

    wanted = config.per_class * len(questions_for(config.domain))
    short = [name for name, got in zip(names, answers, strict=True) if len(got) < wanted / 2]
    if short:
        shown = ", ".join(repr(name) for name in short[:10]) + (" ..." if len(short) > 10 else "")
        warnings.append(
            f"{len(short)} class(es) got fewer than half of the {wanted} requested LLM descriptions "
            f"(the model repeated itself or answered with junk): {shown}"
        )
    return finish(answers, "llm")


__all__ = [
    "CIFAR_TEMPLATES",
    "DOMAIN_QUESTIONS",
    "DOMAIN_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "QUESTIONS",
    "DescriptionConfig",
    "Descriptions",
    "article_for",
    "class_key",
    "class_text",
    "fill",
    "generate_descriptions",
    "normalize_class_name",
    "question_prompts",
    "template_sentences",
    "templates_for",
    "validate_class_names",
]
