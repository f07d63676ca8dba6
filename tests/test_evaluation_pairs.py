"""LFW pairs files: the View 2 ("10 300"), View 1 ("N") and header-less layouts, and errors naming file and line."""

from __future__ import annotations

from collections import Counter

import pytest

from keras_margin.evaluation import PairsFileError, image_paths, parse_pairs, read_pairs


def view2_lines(sets: int, per_set: int) -> list[str]:
    """A pairs.txt in the official layout: header, then per set `per_set` matched and `per_set` mismatched lines."""
    lines = [f"{sets}\t{per_set}"]
    for s in range(sets):
        lines += [f"Person_{s}_{i}\t{i + 1}\t{i + 2}" for i in range(per_set)]
        lines += [f"Person_{s}_{i}\t{i + 1}\tOther_{s}_{i}\t{i + 3}" for i in range(per_set)]
    return lines


def test_view2_10x300_layout():
    pairs = parse_pairs(view2_lines(10, 300))
    assert len(pairs) == 6000
    assert Counter(p.fold for p in pairs) == {fold: 600 for fold in range(10)}
    assert Counter((p.fold, p.same) for p in pairs) == {(f, s): 300 for f in range(10) for s in (True, False)}
    first, mismatched = pairs[0], pairs[300]
    assert (first.first, first.second, first.same, first.line) == ("Person_0_0/Person_0_0_0001.jpg",
                                                                   "Person_0_0/Person_0_0_0002.jpg", True, 2)
    assert (mismatched.first, mismatched.second, mismatched.same, mismatched.line) == (
        "Person_0_0/Person_0_0_0001.jpg", "Other_0_0/Other_0_0_0003.jpg", False, 302)
    assert pairs[-1].fold == 9 and pairs[-1].line == 6001


def test_view1_single_count_header_is_split_into_ten_folds():
    lines = ["20"] + [f"A_{i} 1 2" for i in range(20)] + [f"A_{i} 1 B_{i} 1" for i in range(20)]
    pairs = parse_pairs(lines)
    assert len(pairs) == 40
    # two same-person and two different-person pairs per fold, by position inside each run
    assert Counter((p.fold, p.same) for p in pairs) == {(f, s): 2 for f in range(10) for s in (True, False)}
    assert [p.fold for p in pairs[:4]] == [0, 0, 1, 1]


def test_headerless_list_uses_runs_as_sets():
    lines = ["A 1 2", "B 1 2", "A 1 B 1", "", "C 1 2", "C 1 D 2", "D 2 E 1"]
    pairs = parse_pairs(lines, ext="png")
    assert [(p.fold, p.same, p.line) for p in pairs] == [
        (0, True, 1), (0, True, 2), (0, False, 3), (1, True, 5), (1, False, 6), (1, False, 7)]
    assert pairs[0].first == "A/A_0001.png"


def test_tabs_spaces_and_trailing_blank_lines_are_accepted(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("1 1\r\nAnn   1\t2\nAnn 1 Bob 4\n\n\n")
    assert [(p.second, p.same) for p in read_pairs(path)] == [("Ann/Ann_0002.jpg", True), ("Bob/Bob_0004.jpg", False)]


@pytest.mark.parametrize("lines, message", [
    (["2 1", "A 1 2", "A 1 B 1", "C 1 2 3 4 5", "C 1 D 1"], "pairs.txt:4: expected 'name n1 n2'"),
    (["1 1", "A one 2", "A 1 B 1"], "pairs.txt:2: image number 'one' is not a positive integer"),
    (["1 1", "A 0 2", "A 1 B 1"], "pairs.txt:2: image number '0'"),
    (["1 2", "A 1 2", "A 1 B 1", "C 1 D 1", "E 1 F 2"], "pairs.txt:3: the header (line 1) announces 1 set(s) of 2"),
    (["2 1", "A 1 2", "A 1 B 1"], "pairs.txt:3: the header (line 1) announces 2 x (1 + 1) = 4 pairs but the file "
                                  "ends after 2"),
    (["1 1", "A 1 2", "A 1 B 1", "C 1 2"], "pairs.txt:4: the header (line 1) announces 2 pairs; this line is one"),
    (["A 1 B 2", "A 1 2"], "pairs.txt:1: without a header"),
    (["10 300 7"], "pairs.txt:1: expected a header 'sets pairs_per_set'"),
    (["x"], "pairs.txt:1: expected a header"),
    (["0 300"], "pairs.txt:1: the header announces no pairs"),
    ([], "pairs.txt: the file holds no pairs"),
])
def test_malformed_files_name_the_line(lines, message):
    with pytest.raises(PairsFileError) as error:
        parse_pairs(lines)
    assert message in str(error.value)


def test_missing_pairs_file_is_named(tmp_path):
    with pytest.raises(PairsFileError, match="absent.txt: no such pairs file"):
        read_pairs(tmp_path / "absent.txt")


def test_error_names_the_real_file(tmp_path):
    path = tmp_path / "my_pairs.txt"
    path.write_text("1 1\nA 1 2\nA 1 B x\n")
    with pytest.raises(PairsFileError, match=r"my_pairs.txt:3: image number 'x'"):
        read_pairs(path)


def test_missing_image_names_the_pair_line(tmp_path):
    for name, number in (("Ann", 1), ("Ann", 2), ("Bob", 1)):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f"{name}_{number:04d}.jpg").write_bytes(b"x")
    pairs = parse_pairs(["2 1", "Ann 1 2", "Ann 1 Bob 1", "Bob 1 3", "Ann 2 Bob 1"], source="lfw_pairs.txt")
    with pytest.raises(PairsFileError) as error:
        image_paths(pairs, tmp_path, source="lfw_pairs.txt")
    assert str(error.value).startswith("lfw_pairs.txt:4: image 'Bob/Bob_0003.jpg' is not in ")


def test_image_paths_are_distinct_in_first_use_order(tmp_path):
    for name, number in (("Ann", 1), ("Ann", 2), ("Bob", 1)):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f"{name}_{number:04d}.jpg").write_bytes(b"x")
    pairs = parse_pairs(["1 1", "Ann 2 1", "Ann 1 Bob 1"])
    assert [p.relative_to(tmp_path).as_posix() for p in image_paths(pairs, tmp_path)] == [
        "Ann/Ann_0002.jpg", "Ann/Ann_0001.jpg", "Bob/Bob_0001.jpg"]


def test_missing_images_folder_is_named(tmp_path):
    with pytest.raises(PairsFileError, match="no such images folder"):
        image_paths(parse_pairs(["1 1", "A 1 2", "A 1 B 1"]), tmp_path / "nowhere")
