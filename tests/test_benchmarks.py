"""The benchmarks' bookkeeping: each entry lands in its own section of RESULTS.md, nothing else moves."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from results import append_to_section  # noqa: E402


def test_entries_land_at_the_end_of_their_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## A\n\nfirst A\n\n## B\n\nfirst B\n")
    append_to_section(path, "## A", "second A\n")
    append_to_section(path, "## B", "second B")
    append_to_section(path, "## C", "first C")
    assert path.read_text() == ("# Benchmark results\n\n## A\n\nfirst A\n\nsecond A\n\n## B\n\nfirst B\n\n"
                                "second B\n\n## C\n\nfirst C\n")


def test_a_missing_file_is_created(tmp_path):
    path = tmp_path / "new" / "RESULTS.md"
    path.parent.mkdir()
    append_to_section(path, "## A", "entry")
    assert path.read_text() == "# Benchmark results\n\n## A\n\nentry\n"


def test_text_encoder_binding_variants_keep_or_change_words_as_named():
    import dataclasses
    import re

    import text_encoder_binding as tb

    from sdlearn import shapes

    scenes, rng = tb.two_object_scenes(20, seed=0)
    for scene in scenes:
        base = re.findall(r"\w+", shapes.scene_to_caption(scene))
        for name, objects in tb.variants(scene, rng).items():
            changed = re.findall(r"\w+", shapes.scene_to_caption(dataclasses.replace(scene, objects=objects)))
            assert changed != base
            assert (sorted(changed) == sorted(base)) == name.startswith("binding swap"), name


def test_miscoloured_counts_what_it_names():
    import tinysd_quality as tq

    from sdlearn import shapes

    def image(*objects):
        return shapes.render(shapes.Scene("white", tuple(shapes.SceneObject(*o) for o in objects)))

    two_blue = image(("cross", "blue", "large", "left"), ("cross", "blue", "large", "right"))
    one_red = image(("circle", "red", "large", "center"))
    assert tq.miscoloured([shapes.judge(two_blue, "a large blue cross on the left and a large blue cross on the right "
                                                  "on a white background")]) == (0, 0, 0)
    # Both colours asked for, one drawn on both objects: a binding error.
    assert tq.miscoloured([shapes.judge(two_blue, "a large purple cross on the left and a large blue cross on the "
                                                  "right on a white background")]) == (1, 1, 1)
    # A colour nobody asked for, on a one-object caption.
    assert tq.miscoloured([shapes.judge(one_red, "a large orange circle on a white background")]) == (1, 0, 0)


def test_misplaced_miscounted_and_plural_counts_count_what_they_name():
    import tinysd_quality as tq

    from sdlearn import shapes

    def image(*objects):
        return shapes.render(shapes.Scene("white", tuple(shapes.SceneObject(*o) for o in objects)))

    two = image(("circle", "red", "large", "top left"), ("square", "blue", "large", "bottom right"))
    right = "a large red circle at the top left and a large blue square at the bottom right on a white background"
    exchanged = "a large red circle at the bottom right and a large blue square at the top left on a white background"
    elsewhere = "a large red circle at the top right and a large blue square at the bottom right on a white background"
    assert tq.misplaced([shapes.judge(two, right)]) == (0, 0)
    assert tq.misplaced([shapes.judge(two, exchanged)]) == (1, 1)        # the asked-for cell holds the other object
    assert tq.misplaced([shapes.judge(two, elsewhere)]) == (1, 0)        # the asked-for cell is empty
    one = image(("circle", "red", "large", "center"))
    three = image(("circle", "red", "large", "top left"), ("circle", "red", "large", "bottom right"),
                  ("circle", "red", "large", "top right"))
    assert tq.miscounted([shapes.judge(one, "a large red circle on a white background")]) == (0, 0)
    assert tq.miscounted([shapes.judge(one, "two large red circles on a white background")]) == (1, 1)
    assert tq.miscounted([shapes.judge(two, "a large red circle on a white background")]) == (1, 0)
    # plural_counts: (plural captions, too few objects drawn, too many); a singular caption is not counted.
    verdicts = [shapes.judge(one, "two large red circles on a white background"),                 # one too few
                shapes.judge(two, "two large red circles on a white background"),                 # right number
                shapes.judge(three, "two large red circles on a white background"),               # one too many
                shapes.judge(three, "a large red circle on a white background")]
    assert tq.plural_counts(verdicts) == (3, 1, 1)
