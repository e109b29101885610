"""MVTec AD folder layout (torch-free).

  CATEGORY/train/good/*.png                  good training images
  CATEGORY/test/good/*.png                   good test images (no masks)
  CATEGORY/test/<type>/<stem>.png            defect images, one folder per defect type
  CATEGORY/ground_truth/<type>/<stem>_mask.png   (optional: without the folder the set is image-level)

With a ground_truth/ folder every defect image must have its mask: a missing one would silently turn defect pixels
into "normal" ones. Without one (the common factory case: photos sorted into OK and NOK folders, no masks) the set
is image-level: every folder under test/ other than good/ holds NOK parts, and only image metrics apply.

A feedback folder (linewatch/feedback.py, docs/FEEDBACK.md) reads as an image-level set: its false rejects as good
images, its missed defects as defect type "missed_defect"; `with_missed_defects` adds a feedback folder's missed
defects to any test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from linewatch import feedback
from linewatch.errors import DataError
from linewatch.images import IMAGE_SUFFIXES, list_images

GOOD = "good"
MISSED_DEFECT = feedback.MISSED_DEFECT  # the defect type of the dashboard's "missed defect" corrections
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class Sample:
    path: Path
    defect_type: str  # "good" for defect-free images
    mask_path: Path | None  # None for good images, and for every image of an image-level set
    feedback: feedback.Entry | None = None  # the correction this image is, when it comes from a feedback folder

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type != GOOD


def find_mask(ground_truth: Path, defect_type: str, image: Path) -> Path:
    """The mask of a defect image: ground_truth/<type>/<stem>_mask.<ext> (png first, as MVTec ships)."""
    folder = ground_truth / defect_type
    candidates = [folder / f"{image.stem}{MASK_SUFFIX}.png"]
    candidates += [folder / f"{image.stem}{MASK_SUFFIX}{s}" for s in IMAGE_SUFFIXES if s != ".png"]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"defect image {image} has no ground-truth mask (expected {candidates[0]})")


def read_test_set(category_dir: str | Path) -> list[Sample]:
    """Good and defect test samples of an MVTec-layout category, good first, then defect types alphabetically;
    without ground_truth/ an image-level set (no masks, see `is_image_level`)."""
    category = Path(category_dir)
    if not category.is_dir():
        raise DataError(f"dataset category not found: {category}")
    if feedback.is_feedback_folder(category):
        return read_feedback_set(category)
    test_dir = category / "test"
    if not test_dir.is_dir():
        raise DataError(
            f"{category} is not an MVTec-layout category: no test/ folder (expected test/good and test/<defect type>)"
        )
    type_dirs = sorted(p for p in test_dir.iterdir() if p.is_dir())
    if not any(p.name == GOOD for p in type_dirs):
        raise DataError(f"no good test images: {test_dir / GOOD} is missing")
    defect_dirs = [p for p in type_dirs if p.name != GOOD]
    if not defect_dirs:
        raise DataError(f"no defect types in {test_dir} (expected test/<type>/ folders besides good/)")
    ground_truth = category / "ground_truth"
    if ground_truth.exists() and not ground_truth.is_dir():
        raise DataError(f"{ground_truth} is not a folder (expected ground_truth/<type>/<stem>_mask.png)")
    pixel_level = ground_truth.is_dir()

    samples = [Sample(p, GOOD, None) for p in list_images(test_dir / GOOD)]
    for folder in defect_dirs:
        for image in list_images(folder):
            mask = find_mask(ground_truth, folder.name, image) if pixel_level else None
            samples.append(Sample(image, folder.name, mask))
    return samples


def read_feedback_set(folder: str | Path) -> list[Sample]:
    """A feedback folder as an image-level test set: false rejects (good parts) as good, missed defects as defect
    type "missed_defect"; each image checked against the sha256 its sidecar recorded."""
    root = feedback.feedback_root(Path(folder))
    good = feedback.verified(feedback.entries(root, feedback.FALSE_REJECT))
    missed = feedback.verified(feedback.entries(root, feedback.MISSED_DEFECT))
    if not good or not missed:
        raise DataError(
            f"the feedback folder {root} has {len(good)} false reject(s) and {len(missed)} missed defect(s): as a test "
            f"set it needs both (or evaluate a test set with --feedback {root} to add its missed defects)"
        )
    return [Sample(e.image, GOOD, None, e) for e in good] + [Sample(e.image, MISSED_DEFECT, None, e) for e in missed]


def with_missed_defects(samples: list[Sample], folder: str | Path) -> list[Sample]:
    """`samples` plus the feedback folder's missed defects as defect type "missed_defect" (image-level: no masks)."""
    root = feedback.feedback_root(Path(folder))
    if any(s.defect_type == MISSED_DEFECT for s in samples):
        raise DataError(f"the test set already has a defect type named {MISSED_DEFECT!r}: cannot add {root}'s")
    missed = feedback.verified(feedback.entries(root, feedback.MISSED_DEFECT))
    if not missed:
        raise DataError(f"no missed defects in the feedback folder {root} (nothing under {feedback.MISSED_DEFECT}/)")
    return samples + [Sample(e.image, MISSED_DEFECT, None, e) for e in missed]


def is_image_level(samples: list[Sample]) -> bool:
    """True for a set without masks (no ground_truth/ folder): pixel metrics do not apply."""
    return all(s.mask_path is None for s in samples)


def good_image_folder(data_dir: str | Path) -> Path:
    """Folder of good images for training: an MVTec category's train/good, or `data_dir` itself."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"training data folder not found: {data_dir}")
    train_good = data_dir / "train" / GOOD
    if train_good.is_dir():
        list_images(train_good)  # empty train/good is an error, not a fall-back to the category folder
        return train_good
    if (data_dir / "train").is_dir() or (data_dir / "test").is_dir():
        raise DataError(f"{data_dir} looks like an MVTec category but has no {train_good}")
    list_images(data_dir)
    return data_dir
