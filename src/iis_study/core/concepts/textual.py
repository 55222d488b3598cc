"""Textual concepts scored by CLIP, in the style of Label-free CBM (METHOD §5.4).

Pipeline (:func:`textual_concepts`):

1. a CLIP model scores every concept word against every image: the cosine
   similarity of the L2-normalised image and text embeddings
   (:func:`clip_scores`);
2. words whose mean top-5 score over the train images is ``<= top5_threshold``
   (0.25) are dropped (:func:`filter_by_top5`);
3. a bias-free linear projection ``W`` (D, M') of the backbone representations
   ``z`` is learned with Adam (lr 1e-3, at most 1000 full-batch steps, early
   stop on val) to maximise the cos-cubed similarity between ``z · W`` and the
   CLIP scores (:func:`fit_projection`);
4. words whose val similarity is ``<= sim_threshold`` (0.45) are dropped; the
   concept activations are the projected activations standardised with the mean
   and std of the kept projected *train* activations
   (:meth:`TextualConcepts.activations`).

Label-free CBM's other word filters (word length, similarity to class names,
near-duplicates) are not part of METHOD and are not applied.

Weights: :func:`load_clip` loads real CLIP weights through open-clip-torch
(``pretrained`` tag, downloaded on first use, or a local ``checkpoint`` file).
:func:`tiny_clip` builds a small *randomly initialised* CLIP for tests and
offline demos; its scores carry no meaning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

WORDS_DIR = Path(__file__).resolve().parent / "concept_words"
SHIPPED_WORD_LISTS: tuple[str, ...] = ("digits", "cifar10")


# --------------------------------------------------------------------------- #
# CLIP loading
# --------------------------------------------------------------------------- #
@dataclass
class ClipBundle:
    """A CLIP model with its image preprocessing and text tokenizer.

    Attributes:
        model: an ``open_clip`` CLIP model in eval mode (``encode_image`` / ``encode_text``).
        preprocess: callable mapping a PIL image to a ``(3, H, W)`` float tensor.
        tokenizer: callable mapping a list of strings to a ``(B, L)`` token tensor.
        device: the device the model lives on.
    """

    model: Any
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    device: torch.device


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely (safetensors, or ``torch.load(weights_only=True)``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} does not hold a state dict (got {type(state).__name__})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_clip(
    model_name: str = "ViT-B-16",
    pretrained: str | None = "openai",
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
) -> ClipBundle:
    """Load an open-clip-torch CLIP model.

    Args:
        model_name: an open_clip architecture name (``open_clip.list_models()``).
        pretrained: an open_clip pretrained tag (e.g. ``"openai"``; weights are
            downloaded on first use) or a local weights path; ignored when
            ``checkpoint`` is given.
        checkpoint: a local weights file (``.safetensors`` or a torch state
            dict, loaded with ``weights_only=True``) for offline use.
        device: where to put the model.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        RuntimeError: the weights could not be obtained (e.g. offline), with
            instructions for passing a local checkpoint.
    """
    open_clip = require_open_clip()

    dev = torch.device(device)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint={checkpoint!r}: no such CLIP weights file")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
        missing, unexpected = model.load_state_dict(_read_state_dict(path), strict=False)
        if missing:
            raise ValueError(
                f"checkpoint {path} does not fit model_name={model_name!r}: {len(missing)} missing keys, "
                f"e.g. {missing[:3]}"
            )
        if unexpected:
            logger.warning("checkpoint %s has %d unexpected keys, e.g. %s", path, len(unexpected), unexpected[:3])
        source = str(path)
    else:
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        except Exception as err:  # network errors, unknown tags, missing files
            raise RuntimeError(
                f"could not load CLIP {model_name!r} with pretrained={pretrained!r} ({err}). Without internet, "
                "download the weights elsewhere (e.g. open_clip's 'open_clip_pytorch_model.bin' / "
                "'.safetensors' for this model) and pass checkpoint='/path/to/weights' (textual.checkpoint)."
            ) from err
        source = f"pretrained={pretrained}"
    model = model.to(dev).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    logger.info("Loaded CLIP %s (%s) on %s", model_name, source, dev)
    return ClipBundle(model=model, preprocess=preprocess, tokenizer=tokenizer, device=dev)


def require_open_clip():
    """The ``open_clip`` module, or an ``ImportError`` naming the extra that installs it."""
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "textual concepts need open_clip, an optional extra: pip install 'iis_study[textual]'"
        ) from err
    return open_clip


def tiny_clip(seed: int = 0, image_size: int = 32, embed_dim: int = 32) -> ClipBundle:
    """A small randomly initialised CLIP (1-layer ViT and text transformer), for tests and demos.

    Offline: uses open_clip's bundled BPE tokenizer with context length 16. The
    global torch RNG state is left untouched.
    """
    open_clip = require_open_clip()
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from open_clip.tokenizer import SimpleTokenizer

    context_length = 16
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=max(1, image_size // 4),
                           image_size=image_size)
    text = CLIPTextCfg(context_length=context_length, width=32, heads=2, layers=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)
    preprocess = open_clip.image_transform(image_size, is_train=False, mean=OPENAI_DATASET_MEAN,
                                           std=OPENAI_DATASET_STD)
    return ClipBundle(model=model.eval(), preprocess=preprocess,
                      tokenizer=SimpleTokenizer(context_length=context_length), device=torch.device("cpu"))


# --------------------------------------------------------------------------- #
# Words and scores
# --------------------------------------------------------------------------- #
def read_words(path_or_name: str) -> list[str]:
    """Concept words: a shipped list (``"digits"``, ``"cifar10"``) or a text file.

    One word (or short phrase) per line; ``#`` starts a comment; blank lines and
    repeated words are dropped (first occurrence kept).
    """
    path = WORDS_DIR / f"{path_or_name}.txt" if path_or_name in SHIPPED_WORD_LISTS else Path(path_or_name)
    if not path.is_file():
        raise ValueError(
            f"words={path_or_name!r} is neither a shipped word list {list(SHIPPED_WORD_LISTS)} nor an existing file"
        )
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        word = line.split("#", 1)[0].strip()
        if word and word not in words:
            words.append(word)
    if not words:
        raise ValueError(f"words={path_or_name!r}: the word list {path} is empty")
    return words


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _encode_images(bundle: ClipBundle, images: Sequence[np.ndarray], batch_size: int) -> torch.Tensor:
    """L2-normalised CLIP image embeddings ``(N, E)``."""
    feats = []
    for sl in _batches(len(images), batch_size):
        pixels = torch.stack([bundle.preprocess(Image.fromarray(np.asarray(img)).convert("RGB"))
                              for img in images[sl]])
        feats.append(bundle.model.encode_image(pixels.to(bundle.device)).float())
    return torch.nn.functional.normalize(torch.cat(feats), dim=1)


def _encode_texts(bundle: ClipBundle, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """L2-normalised CLIP text embeddings ``(W, E)``."""
    feats = []
    for sl in _batches(len(texts), batch_size):
        tokens = bundle.tokenizer(list(texts[sl]))
        feats.append(bundle.model.encode_text(tokens.to(bundle.device)).float())
    return torch.nn.functional.normalize(torch.cat(feats), dim=1)


def clip_scores(
    bundle: ClipBundle,
    images: Sequence[np.ndarray],
    words: Sequence[str],
    batch_size: int = 64,
    template: str = "{}",
) -> np.ndarray:
    """Cosine similarities ``(N, W)`` between CLIP image embeddings and the embeddings of ``template.format(word)``."""
    if len(images) == 0 or len(words) == 0:
        raise ValueError(f"clip_scores needs images and words, got {len(images)} images and {len(words)} words")
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' where the word goes, got {template!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with torch.inference_mode():
        img = _encode_images(bundle, images, batch_size)
        txt = _encode_texts(bundle, [template.format(w) for w in words], batch_size)
        scores = (img @ txt.T).clamp_(-1.0, 1.0)
    return scores.cpu().numpy().astype(np.float32)


def filter_by_top5(
    scores: np.ndarray, words: Sequence[str], threshold: float = 0.25
) -> tuple[list[str], np.ndarray]:
    """Keep the words whose mean of their 5 highest scores over images is ``> threshold``.

    With fewer than 5 images, the mean over all images is used.

    Returns:
        ``(kept words, kept column indices)``.

    Raises:
        ValueError: no word survives (names ``top5_threshold``).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(words):
        raise ValueError(f"scores must be (N, {len(words)}) for {len(words)} words, got shape {scores.shape}")
    k = min(5, scores.shape[0])
    top = np.sort(scores, axis=0)[-k:]
    keep = np.flatnonzero(top.mean(axis=0) > threshold)
    if keep.size == 0:
        raise ValueError(
            f"no concept word has a mean top-5 CLIP score above top5_threshold={threshold} "
            f"(tried {len(words)} words, best {top.mean(axis=0).max():.3f}); lower top5_threshold or use other words"
        )
    logger.info("Top-5 filter kept %d of %d words (threshold %.3f)", keep.size, len(words), threshold)
    return [words[i] for i in keep], keep


# --------------------------------------------------------------------------- #
# Projection
# --------------------------------------------------------------------------- #
def cos_cubed_similarity(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-column cos-cubed similarity (Label-free CBM), shape ``(M',)``.

    For each column ``j`` of ``pred`` and ``target`` (both ``(N, M')``):
    centre over samples, cube elementwise, L2-normalise over samples, dot::

        u = (p_j − mean(p_j))³ / ‖(p_j − mean(p_j))³‖₂
        v = (t_j − mean(t_j))³ / ‖(t_j − mean(t_j))³‖₂
        sim_j = Σ_n u_n v_n        ∈ [−1, 1]

    Cubing emphasises the samples with the largest activations (the images a
    concept fires on most).
    """
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred and target must be (N, M') of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")

    def unit_cubed(x: torch.Tensor) -> torch.Tensor:
        c = (x - x.mean(dim=0, keepdim=True)) ** 3
        return c / c.norm(dim=0, keepdim=True).clamp_min(eps)

    return (unit_cubed(pred.float()) * unit_cubed(target.float())).sum(dim=0)


@dataclass
class TextualConcepts:
    """Kept textual concepts and their standardised linear projection.

    Attributes:
        words: the kept concept words (M').
        projection: ``W`` (D, M') float32.
        mean: mean of ``z_train · W`` per concept (M').
        std: std of ``z_train · W`` per concept (M').
        similarity: val cos-cubed similarity of each kept concept (M').
    """

    words: list[str]
    projection: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    similarity: np.ndarray

    def activations(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised concept activations ``(z · W − mean) / std``, shape (N, M')."""
        w = self.projection.to(z.device)
        return (z.float() @ w - self.mean.to(z.device)) / self.std.to(z.device)


def _as_float_tensor(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).float() if not isinstance(x, torch.Tensor) else x.detach().float()
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    return t


def _train_projection(
    z_train: torch.Tensor, clip_train: torch.Tensor, z_val: torch.Tensor, clip_val: torch.Tensor,
    lr: float, max_steps: int, patience: int, seed: int,
) -> tuple[torch.Tensor, int]:
    """Full-batch Adam on ``−mean cos-cubed similarity``; returns the best-on-val ``W`` and its step."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d, m = z_train.shape[1], clip_train.shape[1]
    bound = 1.0 / np.sqrt(d)  # same scale as torch.nn.Linear's default init
    w = ((torch.rand(d, m, generator=gen) * 2 - 1) * bound).to(z_train.device).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best_val, best_w, best_step, since = -np.inf, w.detach().clone(), 0, 0
    for step in range(1, max_steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = -cos_cubed_similarity(z_train @ w, clip_train).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            val = cos_cubed_similarity(z_val @ w, clip_val).mean().item()
        if val > best_val:
            best_val, best_w, best_step, since = val, w.detach().clone(), step, 0
        else:
            since += 1
            if since >= patience:
                break
    logger.info("Projection: best val similarity %.4f at step %d (ran %d steps)", best_val, best_step, step)
    return best_w, best_step


def fit_projection(
    z_train: np.ndarray | torch.Tensor,
    clip_train: np.ndarray | torch.Tensor,
    z_val: np.ndarray | torch.Tensor,
    clip_val: np.ndarray | torch.Tensor,
    lr: float = 1e-3,
    max_steps: int = 1000,
    patience: int = 50,
    sim_threshold: float = 0.45,
    seed: int = 0,
    words: Sequence[str] | None = None,
) -> TextualConcepts:
    """Learn a bias-free projection ``W`` (D, M') so that ``z · W`` matches the CLIP scores.

    Full-batch Adam maximises the mean (over concepts) cos-cubed similarity on
    train; after each step the val similarity is measured and the ``W`` with the
    best val similarity is kept (stop after ``patience`` steps without
    improvement, at most ``max_steps``). Concepts with val similarity
    ``<= sim_threshold`` are dropped; ``mean`` / ``std`` are those of the kept
    projected train activations. ``words`` names the columns (default ``"0"``,
    ``"1"``, ...).

    Raises:
        ValueError: shapes disagree, or no concept survives (names ``sim_threshold``).
    """
    zt, ct = _as_float_tensor(z_train, "z_train"), _as_float_tensor(clip_train, "clip_train")
    zv, cv = _as_float_tensor(z_val, "z_val"), _as_float_tensor(clip_val, "clip_val")
    if zt.shape[0] != ct.shape[0] or zv.shape[0] != cv.shape[0]:
        raise ValueError(f"z and CLIP scores need one row per image: z_train {tuple(zt.shape)} vs clip_train "
                         f"{tuple(ct.shape)}, z_val {tuple(zv.shape)} vs clip_val {tuple(cv.shape)}")
    if zt.shape[1] != zv.shape[1] or ct.shape[1] != cv.shape[1]:
        raise ValueError("train and val must have the same representation size D and number of words")
    if max_steps < 1 or patience < 1:
        raise ValueError(f"max_steps and patience must be >= 1, got {max_steps} and {patience}")
    names = [str(i) for i in range(ct.shape[1])] if words is None else list(words)
    if len(names) != ct.shape[1]:
        raise ValueError(f"words has {len(names)} entries for {ct.shape[1]} CLIP score columns")
    cv, zv = cv.to(zt.device), zv.to(zt.device)
    w, _ = _train_projection(zt, ct.to(zt.device), zv, cv, lr, max_steps, patience, seed)
    with torch.no_grad():
        sim = cos_cubed_similarity(zv @ w, cv).cpu().numpy()
    keep = np.flatnonzero(sim > sim_threshold)
    if keep.size == 0:
        raise ValueError(
            f"no textual concept has a val cos-cubed similarity above sim_threshold={sim_threshold} "
            f"(tried {len(names)} words, best {sim.max():.3f}); lower sim_threshold or use other words"
        )
    w_kept = w[:, torch.as_tensor(keep, device=w.device)].contiguous()
    with torch.no_grad():
        proj = zt @ w_kept
        mean, std = proj.mean(dim=0), proj.std(dim=0).clamp_min(1e-8)
    logger.info("Similarity filter kept %d of %d words (threshold %.3f)", keep.size, len(names), sim_threshold)
    return TextualConcepts(words=[names[i] for i in keep], projection=w_kept.cpu(), mean=mean.cpu(),
                           std=std.cpu(), similarity=sim[keep].astype(np.float32))


def textual_concepts(
    bundle: ClipBundle,
    train_images: Sequence[np.ndarray],
    val_images: Sequence[np.ndarray],
    z_train: np.ndarray | torch.Tensor,
    z_val: np.ndarray | torch.Tensor,
    words: Sequence[str],
    top5_threshold: float = 0.25,
    sim_threshold: float = 0.45,
    template: str = "{}",
    batch_size: int = 64,
    lr: float = 1e-3,
    max_steps: int = 1000,
    patience: int = 50,
    seed: int = 0,
) -> TextualConcepts:
    """Textual concepts end to end: CLIP scores → top-5 filter (train) → projection → similarity filter.

    ``train_images`` / ``val_images`` are the images whose representations are
    ``z_train`` / ``z_val`` (same order).
    """
    if len(train_images) != len(z_train) or len(val_images) != len(z_val):
        raise ValueError(f"need one representation per image: {len(train_images)} train images vs "
                         f"{len(z_train)} z_train rows, {len(val_images)} val images vs {len(z_val)} z_val rows")
    words = list(words)
    train_scores = clip_scores(bundle, train_images, words, batch_size=batch_size, template=template)
    kept_words, cols = filter_by_top5(train_scores, words, threshold=top5_threshold)
    val_scores = clip_scores(bundle, val_images, kept_words, batch_size=batch_size, template=template)
    return fit_projection(z_train, train_scores[:, cols], z_val, val_scores, lr=lr, max_steps=max_steps,
                          patience=patience, sim_threshold=sim_threshold, seed=seed, words=kept_words)
