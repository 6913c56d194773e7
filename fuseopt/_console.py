"""What the ``fuseopt`` commands share: a progress bar and a check of an output path.

tqdm is optional (the ``demo`` extra): it is imported when a bar is made, never at import time, and
without it progress is plain lines on stderr. Nothing here is used by the optimizers themselves.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


class Progress:
    r"""A progress bar on stderr: tqdm's when tqdm is installed, otherwise one line per note.

    Args:
        total (int): number of units of work.
        desc (str): what is being done, shown before the bar.
        enabled (bool): if ``False``, nothing is shown. Default: ``True``.
        use_tqdm (bool or None): ``None`` uses tqdm when it is importable; ``False`` always prints
            plain lines. Default: ``None``.
        lines (bool): without tqdm, print a line for every note (``True``) or only the last note,
            when the bar is closed (``False``, for many small updates). Default: ``True``.

    Example:
        >>> bar = Progress(3, "work", use_tqdm=False)
        >>> for i in range(3):
        ...     bar.update(note=f"item {i}")
        >>> bar.close()
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        enabled: bool = True,
        use_tqdm: bool | None = None,
        lines: bool = True,
    ) -> None:
        self.total, self.desc, self.enabled, self.lines, self.done = total, desc, enabled, lines, 0
        self._note: str | None = None
        self._bar: Any = None
        if enabled and use_tqdm is not False:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1, note: str | None = None) -> None:
        """Count ``n`` more units done; ``note`` (the latest result) is shown beside the bar, or,
        without tqdm, printed as a line ``[done/total] desc: note``."""
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
        elif note is not None:
            self._note = note
            if self.lines:
                self._print()

    def _print(self) -> None:
        print(f"[{self.done}/{self.total}] {self.desc}: {self._note}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish the bar (tqdm leaves it on screen, with its last note)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and not self.lines and self._note is not None:
            self._print()
            self._note = None


def check_output(path: str | os.PathLike[str], option: str) -> Path:
    """Fail now, not after the work, if ``path`` cannot be written.

    Raises:
        ValueError: naming ``option``, when ``path`` is a directory, its folder does not exist or
            is not a folder, or it is not writable.
    """
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise ValueError(f"cannot write {option} {str(path)!r}: it is a directory")
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise ValueError(f"cannot write {option} {str(path)!r}: its folder {str(parent)!r} {why}")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise ValueError(f"cannot write {option} {str(path)!r}: permission denied")
    return path


def check_image_format(path: Path, option: str) -> None:
    """The file suffix must name a format matplotlib writes (it picks the format from it).

    Raises:
        ValueError: naming ``option`` and the accepted suffixes. ImportError: no matplotlib.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    suffix = path.suffix.lstrip(".").lower()
    if suffix not in formats:
        raise ValueError(
            f"cannot write {option} {str(path)!r}: unknown image format {suffix or '(none)'!r}; "
            f"valid suffixes: {', '.join('.' + s for s in sorted(formats))}"
        )


MISSING_EXTRA = 'pip install "fuseopt[demo]"'


def write_plot(draw, path: str | os.PathLike[str], prog: str, option: str = "-o/--output") -> int:
    """Run ``draw()`` (which writes the picture to ``path``) and report it; the exit status: 0,
    or 1 with an error line naming ``option`` when the file cannot be written after all (checked
    at the start, but the disk may have changed since)."""
    try:
        draw()
    except OSError as e:
        print(f"{prog}: error: cannot write {option}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
