"""Unit tests of StopText: text is held back only while it may be the start of a stop string, and
cut exactly before the first stop string, however the text is split into pushes."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dllama_py.generation.stops import StopText

PROPERTY = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def feed(stops, chunks):
    """Push every chunk; returns (what was emitted per push, hit, what flush returned). Stops
    pushing at the first hit, as the generator does."""
    st_ = StopText(stops)
    emitted = []
    for chunk in chunks:
        out, hit = st_.push(chunk)
        emitted.append(out)
        if hit:
            return emitted, True, st_.flush()
    return emitted, False, st_.flush()


def stream(stops, chunks) -> tuple[str, bool]:
    emitted, hit, tail = feed(stops, chunks)
    return "".join(emitted) + tail, hit


# ---- references ------------------------------------------------------------------------------

def ref_cut(text: str, stops) -> int | None:
    """Where the output ends: before the stop string that is complete first (the smallest end; of
    those ending there, the one starting first). None when no stop string occurs."""
    best = None
    for s in stops:
        if not s:
            continue
        start = text.find(s)
        while start >= 0:
            key = (start + len(s), start)
            if best is None or key < best:
                best = key
            start = text.find(s, start + 1)
    return None if best is None else best[1]


def ref_safe(text: str, stops) -> str:
    """What may be emitted of `text` (which holds no stop string) at once: all of it but the
    longest suffix that is a proper prefix of some stop string."""
    hold = 0
    for s in stops:
        for n in range(1, min(len(s), len(text) + 1)):
            if s[:n] == text[len(text) - n:]:
                hold = max(hold, n)
    return text[: len(text) - hold]


def has_inner_stop(stops) -> bool:
    """Whether a stop string occurs inside another one neither at its start nor at its end (see
    test_result_does_not_depend_on_chunking_with_inner_stop)."""
    stops = [s for s in stops if s]
    for a in stops:
        for b in stops:
            if a != b:
                i = a.find(b, 1)
                while i >= 0:
                    if i + len(b) < len(a):
                        return True
                    i = a.find(b, i + 1)
    return False


def split_at(text: str, cuts) -> list[str]:
    cuts = sorted(set(c for c in cuts if 0 < c < len(text)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def check_stream(text: str, stops, chunks) -> None:
    """Every property of one run, push by push, against the references."""
    assert "".join(chunks) == text
    cut = ref_cut(text, stops)
    expected = text if cut is None else text[:cut]
    st_ = StopText(stops)
    consumed, emitted = "", ""
    for chunk in chunks:
        out, hit = st_.push(chunk)
        consumed += chunk
        emitted += out
        first = ref_cut(consumed, stops)
        if first is not None:  # the first stop string completes within this chunk
            assert hit
            assert emitted == consumed[:first] == expected
            assert st_.flush() == ""  # nothing after the stop string ever comes out
            return
        assert not hit
        # released as soon as it cannot be the start of a stop string, and held back otherwise
        assert emitted == ref_safe(consumed, [s for s in stops if s])
    assert cut is None
    assert emitted + st_.flush() == text


# ---- examples --------------------------------------------------------------------------------------

@pytest.mark.parametrize("stops", [[], [""], ["", ""]])
def test_no_stop_strings_pass_everything_through(stops):
    st_ = StopText(stops)
    for piece in ["Hello", " <", "/s>", "", "\n", "🙂", "end"]:
        assert st_.push(piece) == (piece, False)
    assert st_.flush() == ""


def test_held_back_only_while_it_may_start_a_stop_string():
    st_ = StopText(["</s>"])
    assert st_.push("Hello <") == ("Hello ", False)
    assert st_.push("/") == ("", False)
    assert st_.push("x") == ("</x", False)  # "</x" cannot start "</s>": all of it at once
    assert st_.push(" <") == (" ", False)
    assert st_.push("<") == ("<", False)  # the first "<" is released, the second may start it
    assert st_.flush() == "<"


def test_flush_returns_what_was_held_back():
    st_ = StopText(["END"])
    assert st_.push("foo EN") == ("foo ", False)
    assert st_.flush() == "EN"
    assert st_.flush() == ""
    assert StopText(["END"]).flush() == ""


def test_stop_string_over_many_pushes_one_character_at_a_time():
    text = "The answer is 42.\nUser: and now?"
    st_ = StopText(["\nUser:"])
    emitted, hits = [], []
    for ch in text:
        out, hit = st_.push(ch)
        emitted.append(out)
        hits.append(hit)
        if hit:
            break
    assert "".join(emitted) == "The answer is 42."
    assert hits.index(True) == text.index("\nUser:") + len("\nUser:") - 1  # the push that completes it
    assert st_.flush() == ""


def test_emitted_text_cut_exactly_before_the_stop_string_in_one_push():
    st_ = StopText(["STOP"])
    assert st_.push("abSTOPcd") == ("ab", True)
    assert st_.flush() == ""  # neither the stop string nor what follows it
    assert StopText(["STOP"]).push("STOP") == ("", True)


def test_after_a_hit_nothing_is_emitted_twice():
    st_ = StopText(["<|end|>"])
    out1, hit1 = st_.push("Hi <|")
    out2, hit2 = st_.push("end|> more")
    assert (out1, hit1) == ("Hi ", False)
    assert (out2, hit2) == ("", True)
    assert st_.flush() == ""
    assert out1 + out2 == "Hi "


@pytest.mark.parametrize("stops", [["world", "lo"], ["lo", "world"]])
def test_earliest_of_several_stop_strings_wins(stops):
    assert StopText(stops).push("hello world") == ("hel", True)
    assert stream(stops, list("hello world")) == ("hel", True)
    assert stream(["xyz", "o w", "d"], ["hello", " wor", "ld"]) == ("hell", True)


def test_overlapping_prefixes():
    # "ab" completes before "abc" could: the cut is before "ab" either way
    assert stream(["ab", "abc"], ["xa", "b", "c"]) == ("x", True)
    assert stream(["abc", "ab"], ["xabc"]) == ("x", True)
    st_ = StopText(["abc", "abd"])
    assert st_.push("zab") == ("z", False)
    assert st_.push("e") == ("abe", False)
    # "aab" after "aa": the held "aa" may still start "aab"; a third "a" releases one "a"
    st_ = StopText(["aab"])
    assert st_.push("aa") == ("", False)
    assert st_.push("a") == ("a", False)
    assert st_.push("b") == ("", True)
    assert stream(["aab"], ["a", "a", "a", "a", "b", "x"]) == ("aa", True)
    # a stop string that is a suffix of another
    assert stream(["bc", "abc"], list("xabcz")) == ("x", True)
    assert stream(["bc", "abc"], ["xabcz"]) == ("x", True)
    # a repeated character
    assert stream(["aaa"], ["a", "a", "b", "a", "a", "a"]) == ("aab", True)


def test_unicode():
    text = "données 🙂 ok → fin 🛑 rest"
    assert stream(["🛑"], list(text)) == ("données 🙂 ok → fin ", True)
    assert stream(["→ fin"], list(text)) == ("données 🙂 ok ", True)
    st_ = StopText(["👍👎"])
    assert st_.push("a👍") == ("a", False)
    assert st_.push("x") == ("👍x", False)
    st_ = StopText(["ßé"])
    assert st_.push("Maß") == ("Ma", False)
    assert st_.push("e\u0301") == ("ße\u0301", False)  # a decomposed é is not "é"
    assert stream(["é"], ["caf", "é!"]) == ("caf", True)
    assert stream(["\u4e2d\u6587"], ["\u8fd9\u662f\u4e2d", "\u6587\u3002"]) == ("\u8fd9\u662f", True)


def test_empty_stop_string_is_ignored_among_others():
    assert stream(["", "x"], ["ab", "cxd"]) == ("abc", True)
    assert stream([""], ["abc"]) == ("abc", False)
    assert stream(["", "zz"], list("abc")) == ("abc", False)


def test_empty_pushes_change_nothing():
    st_ = StopText(["STOP"])
    assert st_.push("") == ("", False)
    assert st_.push("ST") == ("", False)
    assert st_.push("") == ("", False)
    assert st_.push("OP") == ("", True)


def test_held_text_stays_small():
    # what is held back never exceeds the longest stop string less one character
    st_ = StopText(["abcdef", "xy"])
    consumed = emitted = 0
    for ch in "abcdeabcdeabcdexabcdexabcde" * 20:
        out, hit = st_.push(ch)
        assert not hit
        consumed += 1
        emitted += len(out)
        assert consumed - emitted <= 5
    st_ = StopText(["abcdef"])
    assert "".join(st_.push("abcde")[0] for _ in range(100)) == "abcde" * 99
    assert st_.flush() == "abcde"


# ---- properties --------------------------------------------------------------------------------

ALPHABET = "ab c🙂é"
stop_sets = st.lists(st.text(alphabet=ALPHABET, min_size=0, max_size=4), min_size=0, max_size=4)


@PROPERTY
@given(text=st.text(alphabet=ALPHABET, max_size=40), stops=stop_sets,
       cuts=st.lists(st.integers(min_value=1, max_value=39), max_size=12))
def test_random_chunks_emit_text_up_to_first_stop(text, stops, cuts):
    if has_inner_stop(stops):
        stops = [s for s in stops if not any(s != o and s in o for o in stops)]  # the reference cuts at the earliest start; nested stops are tested below
    chunks = split_at(text, cuts)
    check_stream(text, stops, chunks)
    # and the outcome equals the simple reference text[:first occurrence]
    found = [text.find(s) for s in stops if s and s in text]
    expected = text[: min(found)] if found else text
    assert stream(stops, chunks) == (expected, bool(found))
    assert stream(stops, list(text)) == (expected, bool(found))
    assert stream(stops, [text]) == (expected, bool(found))


@settings(PROPERTY, max_examples=80)
@given(prefix=st.text(alphabet=ALPHABET, max_size=20), stop=st.text(alphabet=ALPHABET, min_size=1, max_size=6),
       suffix=st.text(alphabet=ALPHABET, max_size=10), cuts=st.lists(st.integers(1, 40), max_size=8))
def test_planted_stop_string_is_found(prefix, stop, suffix, cuts):
    text = prefix + stop + suffix
    chunks = split_at(text, cuts)
    out, hit = stream([stop], chunks)
    assert hit
    assert out == text[: text.find(stop)]
    assert len(out) <= len(prefix)
    check_stream(text, [stop], chunks)


def test_random_chunks_seeded():
    # the same property without hypothesis, with longer texts and bigger alphabets
    rng = random.Random(1234)
    alphabet = "abc \n<|>🙂ß中"
    for _ in range(1500):
        stops = ["".join(rng.choices(alphabet, k=rng.randint(0, 5))) for _ in range(rng.randint(0, 4))]
        if has_inner_stop(stops):
            continue
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 80)))
        if stops and rng.random() < 0.5 and stops[0]:
            at = rng.randint(0, len(text))
            text = text[:at] + stops[0] + text[at:]
        chunks = split_at(text, [rng.randint(1, 80) for _ in range(rng.randint(0, 20))])
        check_stream(text, stops, chunks)


def test_result_does_not_depend_on_chunking_with_inner_stop():
    stops = ["abc", "b"]
    assert stream(stops, ["abc"]) == stream(stops, list("abc")) == ("a", True)  # "b" ends first
