"""styles.py: A1111's styles.csv read and applied as A1111's StyleDatabase does, hostile files refused by name."""

import pytest

from clipdiffusion.errors import ClipDiffusionError
from clipdiffusion.styles import (MAX_STYLES_FILE_BYTES, PromptStyle, StyleLibrary, StylesError, merge_prompt,
                                  read_styles)

A1111_FILE = (  # as A1111 1.10 writes it: BOM, header, quoted cells with commas
    '\ufeffname,prompt,negative_prompt\n'
    '"cinematic","cinematic still of {prompt}, film grain","cartoon, drawing"\n'
    'sharp,"sharp focus, 8k",\n'
    '"# a comment row",ignored,ignored\n'
    ',"no name: skipped",\n'
    '\n'
    'neg only,,"blurry"\n')


def write(tmp_path, text, name="styles.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_reads_a1111_file(tmp_path):
    styles = read_styles(write(tmp_path, A1111_FILE))
    assert [s.name for s in styles] == ["cinematic", "sharp", "neg only"]
    assert styles[0] == PromptStyle("cinematic", "cinematic still of {prompt}, film grain", "cartoon, drawing",
                                    "styles.csv")
    assert styles[1].negative_prompt == "" and styles[2].prompt == ""
    assert StyleLibrary.from_files([tmp_path / "styles.csv"]).items()[1] == {
        "name": "sharp", "prompt": "sharp focus, 8k", "negative_prompt": ""}


def test_old_text_column_and_no_negative_column(tmp_path):
    styles = read_styles(write(tmp_path, "name, text\nold, a painting\n"))  # space after the comma: skipped
    assert styles == [PromptStyle("old", "a painting", "", "styles.csv")]


def test_merge_rule_is_a1111s():
    assert merge_prompt("art of {prompt}, red", "a cat") == "art of a cat, red"
    assert merge_prompt("{prompt} and {prompt}", "x") == "x and x"  # every placeholder
    assert merge_prompt(" sharp ", " a cat ") == "a cat, sharp"  # no placeholder: stripped, joined with ", "
    assert merge_prompt("sharp", "") == "sharp" and merge_prompt("", "a cat ") == "a cat"


def test_apply_in_request_order_to_both_prompts(tmp_path):
    library = StyleLibrary.from_files([write(tmp_path, A1111_FILE)])
    prompt, negative, unknown = library.apply("a cat", "ugly", ["cinematic", "None", "sharp", "neg only"])
    # cinematic wraps the prompt, then sharp is appended to the result, as A1111 applies them one after another
    assert prompt == "cinematic still of a cat, film grain, sharp focus, 8k"
    assert negative == "ugly, cartoon, drawing, blurry"
    assert unknown == ["None"]
    prompt2, _, _ = library.apply("a cat", "", ["sharp", "cinematic"])
    assert prompt2 == "cinematic still of a cat, sharp focus, 8k, film grain"
    assert library.apply(" a cat ", "n", ["missing"]) == (" a cat ", "n", ["missing"])  # unknown: untouched


def test_later_definition_wins_across_files(tmp_path):
    a = write(tmp_path, "name,prompt\nx,first\ny,why\n", "a.csv")
    b = write(tmp_path, "name,prompt,negative_prompt\nx,second,neg\n", "b.csv")
    library = StyleLibrary.from_files([a, b])
    assert [s["name"] for s in library.items()] == ["y", "x"]
    assert library.get("x") == PromptStyle("x", "second", "neg", "b.csv") and len(library) == 2


@pytest.mark.parametrize("content, words", [
    ("", "empty"),
    ("prompt,negative_prompt\na,b\n", "no 'name' column"),
    ("name,negative_prompt\na,b\n", "no 'prompt' column"),
    ("name,prompt\nx,a cat, on a mat\n", "line 2: 3 cells"),
    (b"name,prompt\nx,caf\xe9\n", "line 2: not UTF-8"),
    ("name,prompt\nx,a\x00b\n", "NUL"),
    ("name,prompt\nx," + "a" * 70_000 + "\n", "line 2: a cell of 70000 characters"),
])
def test_hostile_files_are_errors_naming_the_file(tmp_path, content, words):
    path = write(tmp_path, content)
    with pytest.raises(StylesError) as err:
        read_styles(path)
    assert str(path) in str(err.value) and words in str(err.value)
    assert isinstance(err.value, ClipDiffusionError)


def test_missing_huge_and_folder(tmp_path):
    with pytest.raises(StylesError, match="no such file"):
        read_styles(tmp_path / "nope.csv")
    with pytest.raises(StylesError, match="not a regular file"):
        read_styles(tmp_path)
    huge = tmp_path / "huge.csv"
    with open(huge, "wb") as f:
        f.truncate(MAX_STYLES_FILE_BYTES + 1)
    with pytest.raises(StylesError, match="huge.csv.*bytes"):
        read_styles(huge)


def test_serve_refuses_a_bad_styles_file_at_startup(tmp_path, capsys):
    from clipdiffusion.cli import main

    bad = write(tmp_path, "prompt\nx\n")
    assert main(["serve", "--styles-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "no 'name' column" in err
    assert main(["serve", "--save-dir", str(tmp_path / "missing")]) == 2
    assert "--save-dir" in capsys.readouterr().err


def test_request_names_checked_once_and_capped(tmp_path):
    from clipdiffusion.request import RequestError
    from clipdiffusion.styles import MAX_REQUEST_STYLES

    library = StyleLibrary.from_files([write(tmp_path, A1111_FILE)])
    assert library.check_names(["x", "sharp", "x", "None", "cinematic"]) == [(0, "x"), (3, "None")]
    assert library.check_names(["sharp"] * MAX_REQUEST_STYLES) == []
    with pytest.raises(RequestError) as err:
        library.check_names(["None"] * (MAX_REQUEST_STYLES + 1))
    assert err.value.field == "styles"
