import json

import numpy as np
import pytest
from PIL import Image

from adapt.errors import AdaptError
from adapt.eval_io import format_table, read_prompts
from adapt.evaluate import run_eval
from adapt.metrics import FEATURE_DIM, distance_to_set, diversity, drift, features, nearest_style, retrieval, style

COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (240, 200, 0), (128, 0, 128), (0, 200, 200)]


def solid(rgb, size=32):
    return Image.new("RGB", (size, size), rgb)


def square(fg, bg=(255, 255, 255), size=32, box=(8, 8, 24, 24)):
    arr = np.full((size, size, 3), bg, dtype=np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = fg
    return Image.fromarray(arr, "RGB")


# Black, yellow, magenta, cyan: a regular tetrahedron in RGB, so all four are equally far apart
# and any wrong target ranks exactly 2.
TETRA = [(0, 0, 0), (255, 255, 0), (255, 0, 255), (0, 255, 255)]


@pytest.fixture
def refs():
    return features([solid(c) for c in TETRA])


def test_features_shape_range_and_paths(tmp_path):
    p = tmp_path / "a.png"
    square((255, 0, 0)).save(p)
    f = features([square((255, 0, 0)), str(p), p])
    assert f.shape == (3, FEATURE_DIM) == (3, 768)
    assert f.min() >= 0.0 and f.max() <= 1.0
    assert np.array_equal(f[0], f[1]) and np.array_equal(f[1], f[2])
    assert features([]).shape == (0, 768)
    with pytest.raises(AdaptError, match="not found"):
        features([tmp_path / "missing.png"])


def test_features_rgba_equals_composited_on_white():
    arr = np.zeros((32, 32, 4), dtype=np.uint8)
    arr[8:24, 8:24] = (200, 30, 30, 255)
    arr[0:8, :] = (0, 0, 0, 0)  # fully transparent (black RGB underneath must not leak)
    arr[24:, :] = (0, 0, 255, 128)  # half transparent
    rgba = Image.fromarray(arr, "RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(white, rgba).convert("RGB")
    np.testing.assert_allclose(features([rgba]), features([flat]))


def test_identical_images_rank_first(refs):
    r = retrieval(refs, refs, [0, 1, 2, 3])
    assert r["top1"] == 1.0 and r["top5"] == 1.0 and r["mean_rank"] == 1.0
    assert r["ranks"] == [1, 1, 1, 1] and r["n"] == 4
    assert r["chance_top1"] == 0.25


def test_permuted_targets_drop_top1(refs):
    r = retrieval(refs, refs, [1, 0, 2, 3])  # two images aimed at the wrong reference
    assert r["top1"] == 0.5
    assert r["ranks"][0] == 2 and r["ranks"][1] == 2
    assert r["mean_rank"] == 1.5


def test_top5_with_fewer_than_five_refs(refs):
    r = retrieval(refs[:3], refs[:3], [1, 2, 0])  # every image aimed wrong
    assert r["top1"] == 0.0
    assert r["top5"] == 1.0 and r["chance_top5"] == 1.0
    assert r["chance_top1"] == pytest.approx(1 / 3)


def test_top5_with_many_refs():
    many = features([solid((i * 20, 255 - i * 20, 100)) for i in range(10)])
    r = retrieval(many[:1], many, [9])  # image 0 aimed at the farthest reference
    assert r["ranks"] == [10] and r["top5"] == 0.0 and r["chance_top5"] == 0.5


def test_ties_favour_intended_reference(refs):
    dup = np.concatenate([refs, refs[:1]])  # reference 4 duplicates reference 0
    r = retrieval(refs[:1], dup, [4])
    assert r["ranks"] == [1]


def test_retrieval_bad_targets(refs):
    with pytest.raises(ValueError):
        retrieval(refs, refs, [0, 1, 2, 9])
    with pytest.raises(ValueError):
        retrieval(refs, refs, [0, 1])


def test_style():
    a = features([square(c) for c in COLOURS[:3]])
    b = features([square(c, box=(0, 0, 32, 12)) for c in COLOURS[:3]])
    assert style(a, a, b)["a_rate"] == 1.0
    s = style(b, a, b)
    assert s["a_rate"] == 0.0 and s["mean_dist_b"] == 0.0 and s["mean_dist_a"] > 0
    assert style(a, a, a)["a_rate"] == 0.5  # ties are neutral


def test_drift(refs):
    assert drift(refs, refs) == 0.0
    assert drift(refs, refs[::-1]) > 0
    with pytest.raises(ValueError):
        drift(refs, refs[:2])


def test_distance_to_set(refs):
    assert distance_to_set(refs[:2], refs) == 0.0
    other = features([solid((128, 128, 128))])
    assert distance_to_set(other, refs) > 0
    # moving toward the set lowers the distance
    near = features([solid((10, 240, 240))])
    assert distance_to_set(near, refs) < distance_to_set(other, refs)


def test_read_prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"caption": "a cat", "file": "cat.png"}\n\n{"prompt": "a dog", "seed": 7}\n{"caption": "x"}\n')
    items = read_prompts(p, base_seed=100)
    assert [it["caption"] for it in items] == ["a cat", "a dog", "x"]
    assert [it["seed"] for it in items] == [100, 7, 102]
    assert items[0]["file"] == "cat.png" and "file" not in items[1]


def test_read_prompts_errors(tmp_path):
    with pytest.raises(AdaptError, match="not found"):
        read_prompts(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "ok"}\n{"caption": "ok2"}\n{"caption": oops}\n')
    with pytest.raises(AdaptError, match="line 3"):
        read_prompts(bad)
    nocap = tmp_path / "nocap.jsonl"
    nocap.write_text('{"caption": "ok"}\n{"file": "a.png"}\n')
    with pytest.raises(AdaptError, match="caption"):
        read_prompts(nocap)
    badseed = tmp_path / "badseed.jsonl"
    badseed.write_text('{"caption": "ok", "seed": "1"}\n')
    with pytest.raises(AdaptError, match="seed"):
        read_prompts(badseed)


def _write_refs(tmp_path):
    refs_dir, refs_b = tmp_path / "refs", tmp_path / "refs_b"
    refs_dir.mkdir()
    refs_b.mkdir()
    items = []
    for i, c in enumerate(COLOURS[:5]):
        name = f"e{i}.png"
        square(c).save(refs_dir / name)
        square(c, box=(0, 0, 32, 12)).save(refs_b / name)
        items.append({"caption": f"emoji {i}", "file": name})
    return refs_dir, refs_b, items


def test_run_eval_with_fake_generator(tmp_path):
    refs_dir, refs_b, items = _write_refs(tmp_path)
    by_caption = {it["caption"]: Image.open(refs_dir / it["file"]).convert("RGB") for it in items}
    calls = []

    def generate(prompts, seeds):
        calls.append((list(prompts), list(seeds)))
        return [by_caption[p].resize((16, 16)) for p in prompts]

    out = tmp_path / "out"
    m = run_eval(generate, items, out, refs_dir=refs_dir, refs_b_dir=refs_b, base_seed=5, batch_size=2, progress=False)
    assert [len(c[0]) for c in calls] == [2, 2, 1]
    assert [s for c in calls for s in c[1]] == [5, 6, 7, 8, 9]
    assert m["fidelity"]["top1"] == 1.0 and m["fidelity"]["m"] == 5
    assert m["style"]["a_rate"] == 1.0
    assert m["drift"] is None
    saved = json.loads((out / "eval.json").read_text())
    assert saved["fidelity"]["top1"] == 1.0
    assert saved["items"][0] == {"caption": "emoji 0", "file": "e0.png", "seed": 5, "rank": 1,
                                 "nearest": "e0.png", "closer_to_a": True}
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 2 * 16, 2 * 16)  # 3 [ref|gen] pairs per row, 2 rows
    assert not list(out.glob("*.tmp"))
    table = format_table(m)
    assert "top-1" in table and "1.000" in table and "0.200" in table


def test_run_eval_compare_and_no_refs(tmp_path):
    items = [{"caption": f"p{i}"} for i in range(3)]

    def gen_a(prompts, seeds):
        return [solid(COLOURS[s % 6], 16) for s in seeds]

    def gen_b(prompts, seeds):
        return [solid(COLOURS[(s + 1) % 6], 16) for s in seeds]

    m = run_eval(gen_a, items, tmp_path / "o1", compare=gen_a, progress=False)
    assert m["drift"] == 0.0 and m["fidelity"] is None
    m = run_eval(gen_a, items, tmp_path / "o2", compare=gen_b, progress=False)
    assert m["drift"] > 0
    assert all(row["drift"] > 0 for row in m["items"])
    assert Image.open(tmp_path / "o2" / "grid.png").size == (2 * 2 * 16, 2 * 16)
    assert "drift" in format_table(m)


def test_run_eval_missing_reference(tmp_path):
    refs_dir, _, items = _write_refs(tmp_path)
    items.append({"caption": "ghost", "file": "ghost.png"})

    def generate(prompts, seeds):
        return [solid((0, 0, 0), 16) for _ in prompts]

    with pytest.raises(AdaptError, match="ghost.png"):
        run_eval(generate, items, tmp_path / "out", refs_dir=refs_dir, progress=False)


def test_nearest_style_picks_the_closest_drawing_of_the_same_subject():
    a = features([solid(c) for c in COLOURS[:3]])
    b = features([solid(c) for c in COLOURS[3:6]])
    gen = np.stack([a[0], b[1], a[2] * 0.9 + b[2] * 0.1])
    assert nearest_style(gen, {"a": a, "b": b}) == ["a", "b", "a"]


def test_diversity_is_zero_for_identical_seeds_and_grows_with_difference():
    same = features([solid(COLOURS[0])] * 3)
    assert diversity(same, ["p"] * 3)["mean"] == 0.0
    mixed = features([solid(COLOURS[0]), solid(COLOURS[1]), solid(COLOURS[0]), solid(COLOURS[0])])
    d = diversity(mixed, ["p", "p", "q", "q"])
    assert d["groups"] == 2 and d["per_group"]["q"] == 0.0 and d["per_group"]["p"] > 1.0
    assert diversity(same[:2], ["p", "q"])["mean"] is None  # one image per prompt: nothing to compare


def test_run_eval_scores_the_style_asked_for_and_distinct_styles_per_prompt(tmp_path):
    dirs = {}
    for name, colours in (("red", COLOURS[0]), ("green", COLOURS[1]), ("blue", COLOURS[2])):
        d = dirs[name] = tmp_path / name
        d.mkdir()
        for f in ("x.png", "y.png"):
            solid(colours).save(d / f)
    draws = {"red": COLOURS[0], "green": COLOURS[1], "blue": COLOURS[2]}

    def gen(prompts, seeds):  # draws the style named last in the prompt, or red/green by seed
        return [solid(draws[p.split()[-1]] if p.split()[-1] in draws else COLOURS[s % 2]) for p, s in zip(prompts, seeds)]

    items = [{"caption": "x in blue", "file": "x.png", "style": "blue", "seed": 0},
             {"caption": "y in green", "file": "y.png", "style": "green", "seed": 1},
             {"caption": "x plain", "file": "x.png", "seed": 0}, {"caption": "x plain", "file": "x.png", "seed": 1}]
    m = run_eval(gen, items, tmp_path / "out", style_dirs=[dirs["red"], dirs["green"], dirs["blue"]], progress=False)
    assert m["styles"]["accuracy"] == 1.0 and m["styles"]["asked"] == 2
    assert [r["nearest_style"] for r in m["items"]] == ["blue", "green", "red", "green"]
    assert m["styles"]["distinct_per_caption"] == (1 + 1 + 2) / 3
    assert m["diversity"]["groups"] == 1 and m["diversity"]["mean"] > 0
    assert "distinct styles per prompt" in format_table(m)
