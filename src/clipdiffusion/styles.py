"""Prompt styles in AUTOMATIC1111's `styles.csv` format. Torch-free.

A styles file is a CSV with a header row naming at least `name` and `prompt` (A1111's oldest files call the prompt
column `text`), and optionally `negative_prompt`; further columns (A1111 1.7 writes none, some tools add a
`description`) are ignored. The file is read as UTF-8 (a byte-order mark is allowed, as A1111 writes one), spaces
after a delimiter are skipped, and rows with an empty name or a name starting with `#` are skipped, all as A1111's
`StyleDatabase` reads it. A name given twice (in one file or across files) takes the later row.

Applying styles follows A1111's `apply_styles_to_prompt`: for each requested style in order, a style text with
the `{prompt}` placeholder has every placeholder replaced by the prompt so far; one without it is appended to the
prompt so far with ", " (empty parts dropped, both stripped). The negative prompt goes through the same steps
with the styles' negative texts. A name that is not in the library changes nothing and is reported.

Everything wrong with a file (missing, too large, not UTF-8, no header, missing columns, a row with more cells
than the header, a NUL byte, too many styles) is a `ClipDiffusionError` naming the file, and the line where there
is one: the server reads its styles at startup, so a bad file stops it there rather than in a request.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field

from .errors import ClipDiffusionError
from .request import RequestError

MAX_STYLES_FILE_BYTES = 8 * 2**20
MAX_STYLES = 20_000
MAX_STYLE_CHARS = 64_000  # per cell; csv's own field limit (131072) is higher
MAX_REQUEST_STYLES = 64  # style names in one request (A1111's UI picks a handful)
PLACEHOLDER = "{prompt}"


class StylesError(ClipDiffusionError):
    """A styles file that cannot be read; the message names the file (and the line where there is one)."""

    def __init__(self, path, reason: str, line: int | None = None):
        self.path, self.reason, self.line = str(path), reason, line
        where = f"{self.path!r}" + (f" line {line}" if line is not None else "")
        super().__init__(f"styles file {where}: {reason}")


@dataclass(frozen=True)
class PromptStyle:
    """One style: the texts applied to the prompt and the negative prompt. `source` is the file's base name (paths
    stay on the server)."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""
    source: str = ""

    def to_a1111(self) -> dict:
        """The item of A1111's `GET /sdapi/v1/prompt-styles`."""
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def merge_prompt(style_text: str, prompt: str) -> str:
    """One style applied to a prompt, A1111's rule: replace `{prompt}`, else join the stripped non-empty parts with
    ", " (prompt first)."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def read_styles(path) -> list[PromptStyle]:
    """The styles of one A1111 `styles.csv`, in file order (a repeated name appears twice; the library keeps the
    last). Raises `StylesError` naming the file for anything it cannot read."""
    path = os.fspath(path)
    try:
        if not os.path.isfile(path):
            raise StylesError(path, "no such file" if not os.path.exists(path) else "not a regular file")
        size = os.path.getsize(path)
        if size > MAX_STYLES_FILE_BYTES:
            raise StylesError(path, f"{size} bytes; a styles file may have at most {MAX_STYLES_FILE_BYTES}")
        with open(path, "rb") as f:
            raw = f.read(MAX_STYLES_FILE_BYTES + 1)
    except OSError as exc:
        raise StylesError(path, f"cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_STYLES_FILE_BYTES:
        raise StylesError(path, f"larger than {MAX_STYLES_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise StylesError(path, f"not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})", line) from None
    if "\x00" in text:
        raise StylesError(path, "contains a NUL character", text[: text.index("\x00")].count("\n") + 1)
    return _parse(path, text)


def _parse(path: str, text: str) -> list[PromptStyle]:
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=False)
    source = os.path.basename(path)
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise StylesError(path, "empty; the first row must name the columns (name,prompt,negative_prompt)", 1)
        columns = [h.strip() for h in header]
        if "name" not in columns:
            raise StylesError(path, f"no 'name' column; the header is {header!r} (A1111's is "
                                    "name,prompt,negative_prompt)", 1)
        prompt_column = "prompt" if "prompt" in columns else ("text" if "text" in columns else None)
        if prompt_column is None:
            raise StylesError(path, f"no 'prompt' column; the header is {header!r} (A1111's is "
                                    "name,prompt,negative_prompt)", 1)
        index = {name: columns.index(name) for name in ("name", prompt_column, "negative_prompt") if name in columns}
        styles: list[PromptStyle] = []
        for row in reader:
            line = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) > len(columns):
                raise StylesError(path, f"{len(row)} cells but the header names {len(columns)} columns (a prompt "
                                        "with commas must be quoted)", line)
            for cell in row:
                if len(cell) > MAX_STYLE_CHARS:
                    raise StylesError(path, f"a cell of {len(cell)} characters; at most {MAX_STYLE_CHARS}", line)

            def cell(column: str) -> str:
                i = index.get(column)
                return row[i] if i is not None and i < len(row) else ""

            name = cell("name")
            if not name.strip() or name.startswith("#"):
                continue
            styles.append(PromptStyle(name, cell(prompt_column), cell("negative_prompt"), source))
            if len(styles) > MAX_STYLES:
                raise StylesError(path, f"more than {MAX_STYLES} styles", line)
    except csv.Error as exc:
        raise StylesError(path, f"not valid CSV ({exc})", reader.line_num or None) from None
    return styles


@dataclass(frozen=True)
class StyleLibrary:
    """Styles by name (the order they were read; a later file's style replaces an earlier one of the same name)."""

    styles: dict[str, PromptStyle] = field(default_factory=dict)
    files: tuple[str, ...] = ()

    @classmethod
    def from_files(cls, paths) -> "StyleLibrary":
        styles: dict[str, PromptStyle] = {}
        files = []
        for path in paths:
            for style in read_styles(path):
                styles.pop(style.name, None)  # a redefinition moves to where it was last defined
                styles[style.name] = style
            files.append(os.fspath(path))
        return cls(styles, tuple(files))

    def __len__(self) -> int:
        return len(self.styles)

    def __contains__(self, name) -> bool:
        return name in self.styles

    def get(self, name: str) -> PromptStyle | None:
        return self.styles.get(name)

    def items(self) -> list[dict]:
        """`GET /sdapi/v1/prompt-styles`: `[{name, prompt, negative_prompt}]`."""
        return [style.to_a1111() for style in self.styles.values()]

    def check_names(self, names, field: str = "styles") -> list[tuple[int, str]]:
        """The names of a request's `styles` that are not in the library, each once as (first index, name); a
        RequestError naming `field` for more than MAX_REQUEST_STYLES names."""
        names = list(names)
        if len(names) > MAX_REQUEST_STYLES:
            raise RequestError(field, f"{len(names)} names", f"at most {MAX_REQUEST_STYLES} styles per request")
        unknown: dict[str, int] = {}
        for i, name in enumerate(names):
            if name not in self.styles and name not in unknown:
                unknown[name] = i
        return [(i, name) for name, i in unknown.items()]

    def apply(self, prompt: str, negative_prompt: str, names) -> tuple[str, str, list[str]]:
        """(prompt, negative prompt, unknown names): the named styles applied in order, A1111's way."""
        unknown = []
        for name in names:
            style = self.styles.get(name)
            if style is None:
                unknown.append(name)
                continue
            prompt = merge_prompt(style.prompt, prompt)
            negative_prompt = merge_prompt(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt, unknown
