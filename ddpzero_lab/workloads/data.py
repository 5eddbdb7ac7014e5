"""The course's data sets, all usable offline: digits, synthetic images, CIFAR-10, a text.

This module owns loading each data set into a `torch.utils.data.Dataset` of (input, target)
pairs and describing it (`DataSplit`: train and eval sets, number of classes, input shape,
vocabulary). Nothing here downloads unless asked to:

* "digits":    scikit-learn's 8x8 handwritten digits (1,797 real images shipped inside
               scikit-learn; Alpaydin & Kaynak, UCI), as 1x8x8 images in [0, 1].
* "synthetic": images with CIFAR-10's shapes (3x32x32, 10 classes) made from a seed: a fixed
               pattern per class plus noise, so that a model can learn them. For speed tests.
* "cifar10":   torchvision's CIFAR-10 from a local copy; `download=True` fetches it where the
               network allows.
* "text":      a character-level data set over a public-domain text shipped in the package
               (texts/README.md says which and why it is free to use).

Datasets implement `__getitems__` (a whole batch of indices at once, as DataLoader asks for
it), so in-memory data sets cost one indexing op per batch. Not owned here: which rank reads
which index (sampler.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

DATASETS = ("digits", "synthetic", "cifar10", "text")
TEXTS_DIR = Path(__file__).with_name("texts")
DEFAULT_TEXT = TEXTS_DIR / "coriolanus_act1.txt"

# CIFAR-10's per-channel training-set mean and standard deviation (the usual normalisation)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class DataSplit:
    """A data set ready for training: what a model needs to know to fit it."""

    name: str
    train: Dataset
    eval: Dataset
    num_classes: int  # classes, or the vocabulary size for text
    input_shape: tuple[int, ...]  # one sample's input, e.g. (3, 32, 32) or (block_size,)
    vocab: list[str] = field(default_factory=list)  # text only: id -> character


class TensorPairs(Dataset):
    """(inputs[i], targets[i]) from two tensors held in memory."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        return self.inputs[index], self.targets[index]

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.inputs[index], self.targets[index]


class SyntheticImages(Dataset):
    """`num_samples` images of `shape` in `num_classes` classes, the same for a given seed.

    Sample i has class i % num_classes (balanced) and is that class's fixed random pattern plus
    Gaussian noise of `noise` standard deviations; each sample's noise comes from its own
    generator seeded by (seed, i), so any index is produced alone, in any order, on any rank.
    """

    def __init__(
        self,
        num_samples: int = 2048,
        shape: tuple[int, ...] = (3, 32, 32),
        num_classes: int = 10,
        seed: int = 0,
        noise: float = 1.0,
    ) -> None:
        if num_samples < 1 or num_classes < 2:
            raise ValueError("SyntheticImages needs num_samples >= 1 and num_classes >= 2")
        self.num_samples, self.shape, self.num_classes = num_samples, tuple(shape), num_classes
        self.seed, self.noise = int(seed), float(noise)
        generator = torch.Generator().manual_seed(self.seed)
        self.patterns = torch.randn((num_classes, *self.shape), generator=generator)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        label = index % self.num_classes
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        image = self.patterns[label] + self.noise * torch.randn(self.shape, generator=generator)
        return image, torch.tensor(label)

    def __getitems__(self, indices: list[int]):
        images, labels = zip(*(self[i] for i in indices), strict=True)
        return torch.stack(images), torch.stack(labels)


class CharDataset(Dataset):
    """Next-character prediction over a text: sample i is (ids[i:i+T], ids[i+1:i+T+1]).

    The vocabulary is the sorted set of characters of `text` (or `vocab` when given, so that a
    held-out part of the text uses the same ids).
    """

    def __init__(self, text: str, block_size: int = 64, vocab: list[str] | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size!r}")
        if len(text) < block_size + 1:
            raise ValueError(
                f"the text has {len(text)} characters; block_size={block_size} needs at least "
                f"{block_size + 1}"
            )
        self.vocab = sorted(set(text)) if vocab is None else list(vocab)
        self.stoi = {ch: i for i, ch in enumerate(self.vocab)}
        unknown = set(text) - set(self.stoi)
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {sorted(unknown)[:10]}")
        self.block_size = block_size
        self.ids = torch.tensor([self.stoi[ch] for ch in text], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids) - self.block_size

    def __getitem__(self, index: int):
        chunk = self.ids[index : index + self.block_size + 1]
        return chunk[:-1], chunk[1:]

    def __getitems__(self, indices: list[int]):
        starts = torch.as_tensor(indices, dtype=torch.long)
        windows = starts[:, None] + torch.arange(self.block_size + 1)
        chunks = self.ids[windows]
        return chunks[:, :-1], chunks[:, 1:]

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.stoi[ch] for ch in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def digits(eval_fraction: float = 1 / 6, split_seed: int = 0) -> DataSplit:
    """scikit-learn's 8x8 digits as 1x8x8 float images in [0, 1], split once at random
    (seeded, so every rank and every run gets the same split)."""
    pixels, targets = _digits_arrays()
    images = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    labels = torch.tensor(targets, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_eval = int(len(labels) * eval_fraction)
    held, kept = order[:n_eval], order[n_eval:]
    return DataSplit(
        "digits",
        TensorPairs(images[kept], labels[kept]),
        TensorPairs(images[held], labels[held]),
        num_classes=10,
        input_shape=(1, 8, 8),
    )


def _digits_arrays():
    """(pixels (1797, 64), labels (1797,)) as numpy arrays, from scikit-learn's copy."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the digits data set comes with scikit-learn: pip install scikit-learn "
            "(a dependency of ddpzero_lab), or use dataset='synthetic'"
        )
    # Read the CSV that load_digits() reads, without importing scikit-learn (and SciPy with
    # it): that import costs each rank about a second and a half. If a release moves the
    # file, fall back to the public function.
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


def synthetic(num_samples: int = 2048, seed: int = 0, num_eval: int = 512) -> DataSplit:
    """Synthetic CIFAR-10-shaped images. The eval set has the same class patterns (one
    SyntheticImages) and noise the training set never sees (the indices after it)."""
    source = SyntheticImages(num_samples + num_eval, seed=seed)
    return DataSplit(
        "synthetic",
        _Range(source, 0, num_samples),
        _Range(source, num_samples, num_samples + num_eval),
        num_classes=10,
        input_shape=(3, 32, 32),
    )


class _Range(Dataset):
    """Samples start..stop-1 of another data set, re-indexed from 0."""

    def __init__(self, source: Dataset, start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self.source[self.start + index]

    def __getitems__(self, indices: list[int]):
        return self.source.__getitems__([self.start + i for i in indices])


def default_data_dir() -> Path:
    """Where CIFAR-10 is looked for: $DDPZERO_DATA, else ~/.cache/ddpzero_lab/data."""
    return Path(os.environ.get("DDPZERO_DATA") or Path.home() / ".cache" / "ddpzero_lab" / "data")


def cifar10(root: str | os.PathLike | None = None, download: bool = False) -> DataSplit:
    """CIFAR-10 (Krizhevsky 2009) through torchvision, normalised per channel.

    Without `download=True` only a local copy under `root` is used (the
    `cifar-10-batches-py` folder torchvision makes); a missing copy is a FileNotFoundError that
    says how to get one.
    """
    from torchvision import datasets, transforms

    root = Path(root) if root is not None else default_data_dir()
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    )
    try:
        train = datasets.CIFAR10(root, train=True, transform=transform, download=download)
        test = datasets.CIFAR10(root, train=False, transform=transform, download=download)
    except RuntimeError as exc:
        if download:
            raise
        raise FileNotFoundError(
            f"CIFAR-10 is not under {root} ({exc}). Download it once where the network allows "
            "(download=True, or --download on the command line), point data_dir / "
            "$DDPZERO_DATA at a copy, or use dataset='synthetic' (same shapes) or 'digits' "
            "(real, offline)"
        ) from exc
    except OSError as exc:  # the download itself failed (no network, a proxy)
        raise RuntimeError(
            f"downloading CIFAR-10 into {root} failed ({type(exc).__name__}: {exc}); copy "
            "cifar-10-python.tar.gz there by hand, or use dataset='synthetic' or 'digits'"
        ) from exc
    return DataSplit(
        "cifar10", _Batched(train), _Batched(test), num_classes=10, input_shape=(3, 32, 32)
    )


class _Batched(Dataset):
    """A map-style data set of (tensor, int) pairs, with targets batched into a tensor."""

    def __init__(self, source: Dataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label = self.source[index]
        return image, torch.tensor(label)

    def __getitems__(self, indices: list[int]):
        images, labels = zip(*(self.source[i] for i in indices), strict=True)
        return torch.stack(images), torch.tensor(labels)


def text(
    block_size: int = 64, path: str | os.PathLike | None = None, eval_fraction: float = 0.1
) -> DataSplit:
    """A character-level data set: the first 90% of the text trains, the rest evaluates."""
    source = Path(path) if path is not None else DEFAULT_TEXT
    content = source.read_text(encoding="utf-8")
    cut = int(len(content) * (1 - eval_fraction))
    vocab = sorted(set(content))
    train = CharDataset(content[:cut], block_size, vocab)
    held = CharDataset(content[cut:], block_size, vocab)
    return DataSplit(
        "text", train, held, num_classes=len(vocab), input_shape=(block_size,), vocab=vocab
    )


def load(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    block_size: int = 64,
    num_samples: int = 2048,
    seed: int = 0,
) -> DataSplit:
    """The DataSplit called `name` (one of DATASETS)."""
    if name == "digits":
        return digits()
    if name == "synthetic":
        return synthetic(num_samples=num_samples, seed=seed)
    if name == "cifar10":
        return cifar10(data_dir, download=download)
    if name == "text":
        return text(block_size)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
