"""Generation entropy: n-gram entropy with known values."""
import math

import pytest

from jaxedit.eval import generation


# ----------------------------------------------------------------------------------- n-gram entropy
def test_ngram_entropy_known_value():
    # tokens a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert generation.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert generation.ngram_entropy("word") == 0.0
    assert generation.word_tokens("He didn't go, did he?") == ["He", "did", "n't", "go", ",", "did", "he", "?"]
    assert generation.mean_ngram_entropy(["a b a b", "word"]) == pytest.approx(generation.ngram_entropy("a b a b") / 2)


def test_ngram_entropy_repetitive_is_lower():
    repetitive = "the cat is the cat is the cat is the cat is the cat is the cat is"
    varied = "the cat sat on a mat while seven dogs barked loudly at passing cars near the old mill"
    assert generation.ngram_entropy(repetitive) < generation.ngram_entropy(varied) - 1.0
