"""MMEB readers, registry, prompts and the bad-data policy, on tiny datasets in the real layouts.

Parquet files are written with pyarrow into a data root, images as small PNGs into a separate
image root, so every relative path really has to be resolved against `image_root`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm2vec_jax.data.bad_data import BadDataError, BadDataHandler, BadDataReport
from vlm2vec_jax.data.mmeb_eval import read_mmeb_eval
from vlm2vec_jax.data.mmeb_train import TrainSet, read_mmeb_train
from vlm2vec_jax.data.prompts import (
    ANSWER_PROMPT,
    CLASS_LABEL_PROMPT,
    IMAGE_CAPTION_PROMPT,
    positive_prompt,
    to_backbone_text,
    with_prompt,
)
from vlm2vec_jax.data.records import Side, TrainPair
from vlm2vec_jax.data.registry import (
    EVAL_DATASETS,
    TRAIN_SUBSETS,
    UnknownDatasetError,
    eval_dataset_info,
    train_subset_info,
)

CLS_QUERY = "<|image_1|>\nRepresent the given image for classification"
T2I_TARGET = "<|image_1|>\nRepresent the given image."
PAD = "<|image_pad|>"


def write_parquet(path: Path, columns: dict[str, list], types: dict[str, pa.DataType] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    types = types or {}
    pq.write_table(pa.table({k: pa.array(v, type=types.get(k)) for k, v in columns.items()}), path)


def train_columns(*rows: tuple[str, str, str, str]) -> dict[str, list]:
    keys = ("qry", "qry_image_path", "pos_text", "pos_image_path")
    return {k: [r[i] for r in rows] for i, k in enumerate(keys)}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "imgs").mkdir()
    for name, color in {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}.items():
        Image.new("RGB", (8, 6), color).save(root / "imgs" / f"{name}.png")
    (root / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="module")
def train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four subsets: two files + a second split (ImageNet_1K), the nested layout (VisDial),
    MMEB's single string negatives (MSCOCO_i2t) and B3's list negatives (OK-VQA)."""
    root = tmp_path_factory.mktemp("mmeb_train")
    write_parquet(
        root / "ImageNet_1K" / "original-00000-of-00002.parquet",
        train_columns((CLS_QUERY, "imgs/red.png", "red", ""), (CLS_QUERY, "imgs/green.png", "green", "")),
    )
    write_parquet(
        root / "ImageNet_1K" / "original-00001-of-00002.parquet",
        train_columns((CLS_QUERY, "imgs/blue.png", "blue", "")),
    )
    write_parquet(
        root / "ImageNet_1K" / "diverse_instruction-00000-of-00001.parquet",
        train_columns(("<|image_1|> What is shown?", "imgs/red.png", "red", "")),
    )
    write_parquet(
        root / "VisDial" / "original" / "part-0.parquet",
        train_columns(("Dialog: is it red? yes", "", T2I_TARGET, "imgs/red.png")),
    )
    write_parquet(
        root / "MSCOCO_i2t" / "original-00000-of-00001.parquet",
        {
            **train_columns(("<|image_1|> Find a caption.", "imgs/red.png", "a red square", ""),
                            ("<|image_1|> Find a caption.", "imgs/blue.png", "a blue square", "")),
            "neg_text": ["a blue square", ""],
            "neg_image_path": ["", ""],
        },
    )
    write_parquet(
        root / "OK-VQA" / "original-00000-of-00001.parquet",
        {
            **train_columns(("<|image_1|> What color is it?", "imgs/green.png", "green", "")),
            "neg_text": [["red", T2I_TARGET]],
            "neg_image_path": [["", "imgs/blue.png"]],
        },
    )
    (root / "not_a_subset").mkdir()  # a folder without parquet files is not a subset
    return root


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mmeb_eval")
    list_types = {"tgt_text": pa.list_(pa.string()), "tgt_img_path": pa.list_(pa.string())}
    write_parquet(
        root / "ImageNet-1K" / "test-00000-of-00001.parquet",
        {
            "qry_text": [CLS_QUERY, CLS_QUERY],
            "qry_img_path": ["imgs/red.png", "imgs/blue.png"],
            "tgt_text": [["red", "green", "blue"], ["blue", "red", "green"]],
            "tgt_img_path": [["", "", ""], ["", "", ""]],
        },
        list_types,
    )
    write_parquet(
        root / "MSCOCO_t2i" / "test-00000-of-00001.parquet",
        {
            "qry_text": ["Find me an everyday image that matches the given caption: a red square"],
            "qry_img_path": [""],
            "tgt_text": [[T2I_TARGET, T2I_TARGET]],
            "tgt_img_path": [["imgs/red.png", "imgs/blue.png"]],
        },
        list_types,
    )
    write_parquet(
        root / "SynthShapes" / "test-00000-of-00001.parquet",
        {"qry_text": ["How many sides?"], "qry_img_path": [""], "tgt_text": [["4", "3"]], "tgt_img_path": [["", ""]]},
        list_types,
    )
    (root / "datasets.json").write_text(json.dumps({"SynthShapes": {"meta_task": "vqa", "split": "OOD"}}))
    return root


# ------------------------------------------------------------------------------------- registry
def test_registry_has_mmebs_36_datasets_and_20_subsets() -> None:
    assert len(EVAL_DATASETS) == 36
    assert Counter(i.meta_task for i in EVAL_DATASETS.values()) == {
        "classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4
    }
    assert Counter(i.split for i in EVAL_DATASETS.values()) == {"IND": 20, "OOD": 16}
    assert eval_dataset_info("Visual7W-Pointing").meta_task == "grounding"
    assert eval_dataset_info("MSCOCO").split == "IND"
    assert eval_dataset_info("Wiki-SS-NQ").split == "OOD"
    assert len(TRAIN_SUBSETS) == 20
    assert Counter(i.meta_task for i in TRAIN_SUBSETS.values()) == {
        "classification": 5, "vqa": 6, "retrieval": 8, "grounding": 1
    }
    # every training subset is an IND evaluation dataset (ImageNet_1K is ImageNet-1K there)
    ind = {n for n, i in EVAL_DATASETS.items() if i.split == "IND"}
    assert {n.replace("ImageNet_1K", "ImageNet-1K") for n in TRAIN_SUBSETS} == ind


def test_registry_merges_datasets_json(tmp_path: Path) -> None:
    (tmp_path / "datasets.json").write_text(
        json.dumps({"SynthShapes": {"meta_task": "classification", "split": "IND"},
                    "MSCOCO": {"meta_task": "retrieval", "split": "OOD"}})
    )
    assert eval_dataset_info("SynthShapes", tmp_path).meta_task == "classification"
    assert eval_dataset_info("MSCOCO", tmp_path).split == "OOD"  # the file wins over the built-in table
    assert eval_dataset_info("ImageNet-A", tmp_path).split == "OOD"  # built-ins stay
    with pytest.raises(UnknownDatasetError, match=r"'ImageNet1K'.*Known: .*ImageNet-1K.*SynthShapes"):
        eval_dataset_info("ImageNet1K", tmp_path)
    with pytest.raises(UnknownDatasetError, match="datasets.json"):
        eval_dataset_info("SynthShapes")  # not without the root


def test_registry_train_roots_need_meta_task_only_and_bad_entries_are_named(tmp_path: Path) -> None:
    (tmp_path / "datasets.json").write_text(json.dumps({"SynthPairs": {"meta_task": "retrieval"}}))
    assert train_subset_info("SynthPairs", tmp_path).meta_task == "retrieval"
    with pytest.raises(ValueError, match="SynthPairs.*needs `split`"):
        eval_dataset_info("SynthPairs", tmp_path)
    (tmp_path / "datasets.json").write_text(json.dumps({"X": {"meta_task": "captioning"}}))
    with pytest.raises(ValueError, match=r"entry 'X': meta_task must be one of"):
        train_subset_info("X", tmp_path)
    with pytest.raises(UnknownDatasetError, match="ImageNet_1K"):
        train_subset_info("ImageNet-1K")  # train spells it with an underscore


# -------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize(
    ("name", "prompt"),
    [
        ("ImageNet-1K", CLASS_LABEL_PROMPT), ("ImageNet_1K", CLASS_LABEL_PROMPT), ("Country211", CLASS_LABEL_PROMPT),
        ("OK-VQA", ANSWER_PROMPT), ("ScienceQA", ANSWER_PROMPT),
        ("MSCOCO_i2t", IMAGE_CAPTION_PROMPT), ("VisualNews_i2t", IMAGE_CAPTION_PROMPT),
        ("MSCOCO_t2i", ""), ("VisDial", ""), ("WebQA", ""), ("MSCOCO", ""), ("RefCOCO", ""),
    ],
)
def test_positive_prompts_follow_b3_table_5(name: str, prompt: str) -> None:
    info = EVAL_DATASETS.get(name) or TRAIN_SUBSETS[name]
    assert positive_prompt(info) == prompt


def test_placeholders_map_to_the_backbone_token_and_prompts_prefix() -> None:
    assert to_backbone_text("<|image_1|>\nRepresent <|image_12|>") == f"{PAD}\nRepresent {PAD}"
    assert to_backbone_text(None) == ""
    assert with_prompt(Side("red"), CLASS_LABEL_PROMPT) == Side("Represent the class label: red")
    assert with_prompt(Side("x", "/a.png"), "") == Side("x", "/a.png")


# ---------------------------------------------------------------------------------- train reader
def test_train_reader_layouts_order_and_image_root(train_root: Path, image_root: Path) -> None:
    ts = read_mmeb_train(train_root, image_root=image_root)
    assert ts.names == ("ImageNet_1K", "MSCOCO_i2t", "OK-VQA", "VisDial")  # "all": sorted folders with the split
    assert len(ts) == 3 + 2 + 1 + 1 and ts.offsets == (0, 3, 5, 6, 7)
    first = ts[0]
    assert first == TrainPair(
        "ImageNet_1K", 0, Side(to_backbone_text(CLS_QUERY), str(image_root / "imgs/red.png")),
        Side("Represent the class label: red"),
    )
    assert [p.positive.text for p in ts[:3]] == [f"{CLASS_LABEL_PROMPT}{c}" for c in ("red", "green", "blue")]
    assert ts[6].query == Side("Dialog: is it red? yes") and ts[6].positive.image == str(image_root / "imgs/red.png")
    assert ts[6].positive.text == f"{PAD}\nRepresent the given image."  # retrieval: no B3 prefix
    assert ts[3].positive.text == IMAGE_CAPTION_PROMPT + "a red square"
    assert ts.report.total == 0


def test_train_reader_options(train_root: Path, image_root: Path) -> None:
    ts = read_mmeb_train(
        train_root, ["VisDial", "ImageNet_1K"], image_root=image_root, max_rows_per_subset=2, positive_prompts=False
    )
    assert ts.names == ("VisDial", "ImageNet_1K")  # the order given
    assert [(p.dataset, p.row, p.positive.text) for p in ts] == [
        ("VisDial", 0, f"{PAD}\nRepresent the given image."), ("ImageNet_1K", 0, "red"), ("ImageNet_1K", 1, "green")
    ]
    diverse = read_mmeb_train(train_root, ["ImageNet_1K"], split="diverse_instruction", image_root=image_root)
    assert [p.query.text for p in diverse] == [f"{PAD} What is shown?"]
    with pytest.raises(FileNotFoundError, match=r"'CIRR'.*folders with that split: \['ImageNet_1K', 'MSCOCO_i2t'"):
        read_mmeb_train(train_root, ["CIRR"], image_root=image_root)
    with pytest.raises(ValueError, match="listed twice"):
        read_mmeb_train(train_root, ["VisDial", "VisDial"], image_root=image_root)


def test_train_reader_hard_negatives(train_root: Path, image_root: Path) -> None:
    plain = read_mmeb_train(train_root, ["MSCOCO_i2t", "OK-VQA"], image_root=image_root)
    assert all(p.negatives == () for p in plain)
    ts = read_mmeb_train(train_root, ["MSCOCO_i2t", "OK-VQA", "VisDial"], image_root=image_root, hard_negatives=True)
    assert ts[0].negatives == (Side(IMAGE_CAPTION_PROMPT + "a blue square"),)  # one string negative, prompted
    assert ts[1].negatives == ()  # "" / "" means no negative
    assert ts[2].negatives == (
        Side(ANSWER_PROMPT + "red"),
        Side(ANSWER_PROMPT + f"{PAD}\nRepresent the given image.", str(image_root / "imgs/blue.png")),
    )
    assert ts[3].negatives == ()  # VisDial has no negative columns


def test_trainset_maps_global_indices_to_rows_and_back() -> None:
    def pairs(name: str, rows: list[int]) -> list[TrainPair]:
        return [TrainPair(name, r, Side(f"q{r}"), Side(f"p{r}")) for r in rows]

    ts = TrainSet({"A": pairs("A", [0, 2, 3]), "B": pairs("B", [1, 5])})
    assert [ts.locate(i) for i in range(len(ts))] == [("A", 0), ("A", 2), ("A", 3), ("B", 1), ("B", 5)]
    assert all(ts.index_of(*ts.locate(i)) == i for i in range(len(ts)))
    assert ts.subset_range("B") == range(3, 5)
    with pytest.raises(KeyError, match="A row 1 is not in this TrainSet"):
        ts.index_of("A", 1)
    with pytest.raises(KeyError, match="no subset 'C'"):
        ts.index_of("C", 0)
    with pytest.raises(IndexError):
        ts.locate(5)
    assert ts.fingerprint == TrainSet({"A": pairs("A", [0, 2, 3]), "B": pairs("B", [1, 5])}).fingerprint
    assert ts.fingerprint != TrainSet({"A": pairs("A", [0, 2, 4]), "B": pairs("B", [1, 5])}).fingerprint
    with pytest.raises(ValueError, match="strictly increasing"):
        TrainSet({"A": pairs("A", [1, 0])})


# ------------------------------------------------------------------------------------- bad data
@pytest.fixture()
def bad_train_root(tmp_path: Path) -> Path:
    """One kind of bad row per subset; good rows around them."""
    good = (CLS_QUERY, "imgs/red.png", "red", "")
    write_parquet(
        tmp_path / "HatefulMemes" / "original-00000-of-00001.parquet",
        train_columns(good, (CLS_QUERY, "imgs/missing.png", "yes", ""), good),
    )
    write_parquet(tmp_path / "N24News" / "original-00000-of-00001.parquet", train_columns(("", "", "sports", ""), good))
    write_parquet(
        tmp_path / "SUN397" / "original-00000-of-00001.parquet", train_columns(good, good, (CLS_QUERY, "", "x", ""))
    )
    return tmp_path


def test_bad_rows_are_skipped_and_counted_in_training(bad_train_root: Path, image_root: Path) -> None:
    ts = read_mmeb_train(bad_train_root, image_root=image_root)  # training default: skip
    assert [(p.dataset, p.row) for p in ts] == [
        ("HatefulMemes", 0), ("HatefulMemes", 2), ("N24News", 1), ("SUN397", 0), ("SUN397", 1)
    ]
    assert ts.index_of("HatefulMemes", 2) == 1
    assert ts.report.metrics() == {
        "data/skipped/HatefulMemes/missing_image": 1,
        "data/skipped/N24News/empty_side": 1,
        "data/skipped/SUN397/placeholder_mismatch": 1,
    }
    unchecked = read_mmeb_train(bad_train_root, ["HatefulMemes"], image_root=image_root, check_images=False)
    assert len(unchecked) == 3  # existence left to the pipeline


@pytest.mark.parametrize(
    ("subset", "fragments"),
    [
        ("HatefulMemes", ["HatefulMemes row 1", "column 'qry_image_path'", "imgs/missing.png", "image_root"]),
        ("N24News", ["N24News row 0", "column 'qry'", "neither text nor image", "'qry_image_path'"]),
        ("SUN397", ["SUN397 row 2", "column 'qry'", "1 image placeholder(s)", "0 image(s)"]),
    ],
)
def test_bad_rows_raise_a_message_that_says_where_under_error(
    bad_train_root: Path, image_root: Path, subset: str, fragments: list[str]
) -> None:
    with pytest.raises(BadDataError) as err:
        read_mmeb_train(bad_train_root, [subset], image_root=image_root, bad_data="error")
    for fragment in [*fragments, "bad_data='skip'"]:
        assert fragment in str(err.value)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_missing_column_is_always_an_error(tmp_path: Path, policy: str) -> None:
    columns = train_columns(("q", "", "p", ""))
    del columns["pos_image_path"]
    write_parquet(tmp_path / "VOC2007" / "original-00000-of-00001.parquet", columns)
    with pytest.raises(BadDataError) as err:
        read_mmeb_train(tmp_path, bad_data=policy)
    message = str(err.value)
    assert "VOC2007/original-00000-of-00001.parquet" in message and "['pos_image_path']" in message
    assert "columns found: ['qry', 'qry_image_path', 'pos_text']" in message


def test_a_lone_negative_column_is_reported_missing_its_partner(tmp_path: Path) -> None:
    write_parquet(
        tmp_path / "CIRR" / "original-00000-of-00001.parquet", {**train_columns(("q", "", "p", "")), "neg_text": ["n"]}
    )
    assert len(read_mmeb_train(tmp_path)) == 1  # negatives off: the column is not read
    with pytest.raises(BadDataError, match=r"missing column\(s\) \['neg_image_path'\]"):
        read_mmeb_train(tmp_path, hard_negatives=True)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_pipeline_image_loading_follows_the_policy(image_root: Path, policy: str) -> None:
    handler = BadDataHandler(policy)
    assert handler.load_image(str(image_root / "imgs/red.png"), dataset="D", row=0, column="x").size == (8, 6)
    corrupt, missing = str(image_root / "imgs/corrupt.png"), str(image_root / "imgs/nope.png")
    if policy == "skip":
        assert handler.load_image(corrupt, dataset="D", row=3, column="pos_image_path") is None
        assert handler.load_image(missing, dataset="D", row=4, column="qry_image_path") is None
        assert handler.report.metrics() == {"data/skipped/D/corrupt_image": 1, "data/skipped/D/missing_image": 1}
        return
    with pytest.raises(BadDataError, match=r"D row 3, column 'pos_image_path': cannot decode image .*corrupt\.png"):
        handler.load_image(corrupt, dataset="D", row=3, column="pos_image_path")
    with pytest.raises(BadDataError, match=r"D row 4, column 'qry_image_path': image file not found: .*nope\.png"):
        handler.load_image(missing, dataset="D", row=4, column="qry_image_path")


def test_reports_merge_and_policies_are_validated() -> None:
    a, b = BadDataReport(), BadDataReport()
    a.add("X", "missing_image", 2)
    b.add("X", "missing_image")
    b.add("Y", "empty_side")
    assert a.merge(b) is a and a.total == 4
    assert a.metrics() == {"data/skipped/X/missing_image": 3, "data/skipped/Y/empty_side": 1}
    with pytest.raises(ValueError, match=r"one of \['error', 'skip'\]"):
        BadDataHandler("ignore")


# ----------------------------------------------------------------------------------- eval reader
def test_eval_reader_lists_ground_truth_and_prompts(eval_root: Path, image_root: Path) -> None:
    data = read_mmeb_eval(eval_root, image_root=image_root)
    assert list(data) == ["ImageNet-1K", "MSCOCO_t2i", "SynthShapes"]
    cls = data["ImageNet-1K"]
    assert [q.row for q in cls] == [0, 1]
    assert cls[1].query == Side(to_backbone_text(CLS_QUERY), str(image_root / "imgs/blue.png"))
    assert [c.text for c in cls[1].candidates] == [CLASS_LABEL_PROMPT + t for t in ("blue", "red", "green")]
    t2i = data["MSCOCO_t2i"][0]
    assert t2i.query.image is None
    assert t2i.candidates == tuple(
        Side(f"{PAD}\nRepresent the given image.", str(image_root / f"imgs/{c}.png")) for c in ("red", "blue")
    )
    assert [c.text for c in data["SynthShapes"][0].candidates] == [ANSWER_PROMPT + "4", ANSWER_PROMPT + "3"]

    plain = read_mmeb_eval(eval_root, ["ImageNet-1K"], image_root=image_root, positive_prompts=False, max_rows=1)
    assert [[c.text for c in q.candidates] for q in plain["ImageNet-1K"]] == [["red", "green", "blue"]]


def test_eval_reader_rejects_unknown_datasets(tmp_path: Path) -> None:
    write_parquet(
        tmp_path / "Mystery" / "test-00000-of-00001.parquet",
        {"qry_text": ["q"], "qry_img_path": [""], "tgt_text": [["t"]], "tgt_img_path": [[""]]},
    )
    with pytest.raises(UnknownDatasetError, match=r"unknown evaluation dataset 'Mystery'.*Known: ImageNet-1K"):
        read_mmeb_eval(tmp_path)


def test_eval_bad_candidates_error_by_default_and_skip_on_request(tmp_path: Path, image_root: Path) -> None:
    write_parquet(
        tmp_path / "CIRR" / "test-00000-of-00001.parquet",
        {
            "qry_text": ["<|image_1|> Make it blue", "<|image_1|> Make it red"],
            "qry_img_path": ["imgs/red.png", "imgs/blue.png"],
            "tgt_text": [[T2I_TARGET, T2I_TARGET], [T2I_TARGET, T2I_TARGET]],
            "tgt_img_path": [["imgs/blue.png", "imgs/gone.png"], ["imgs/red.png", "imgs/green.png"]],
        },
    )
    with pytest.raises(BadDataError) as err:
        read_mmeb_eval(tmp_path, image_root=image_root)
    assert all(f in str(err.value) for f in ("CIRR row 0", "column 'tgt_img_path'", str(image_root / "imgs/gone.png")))
    report = BadDataReport()
    data = read_mmeb_eval(tmp_path, image_root=image_root, bad_data="skip", report=report)
    assert [q.row for q in data["CIRR"]] == [1]
    assert report.metrics() == {"data/skipped/CIRR/missing_image": 1}


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize(
    ("tgt_text", "tgt_img_path", "message"),
    [
        ([["a", "b"], ["a", "b", "c"]], [["", ""], ["", ""]], r"row 1: tgt_text and tgt_img_path .* 3 and a list of 2"),
        ([["a", "b"], []], [["", ""], []], r"row 1: no candidates"),
    ],
)
def test_eval_broken_candidate_lists_are_always_an_error(
    tmp_path: Path, policy: str, tgt_text: list, tgt_img_path: list, message: str
) -> None:
    write_parquet(
        tmp_path / "VizWiz" / "test-00000-of-00001.parquet",
        {"qry_text": ["q0", "q1"], "qry_img_path": ["", ""], "tgt_text": tgt_text, "tgt_img_path": tgt_img_path},
        {"tgt_text": pa.list_(pa.string()), "tgt_img_path": pa.list_(pa.string())},
    )
    with pytest.raises(BadDataError, match="VizWiz " + message):
        read_mmeb_eval(tmp_path, bad_data=policy)
