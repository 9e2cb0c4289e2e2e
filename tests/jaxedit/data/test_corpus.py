"""Text corpora for C0: WikiText articles, paragraphs, and token samples."""
from jaxedit.data import corpus
from jaxedit.testing import CharTokenizer


def test_wikitext_split_into_articles(corpus_file):
    docs = corpus.read_text_corpus(corpus_file)
    assert len(docs) == 6
    assert docs[0].startswith("= First Article =") and "= = A Section = =" in docs[0]
    assert "= = = A Subsection = = =" in docs[0] and "More text" in docs[0]
    assert docs[1].startswith("= Second Article =") and docs[1].endswith("second article .")
    assert corpus.read_text_corpus(corpus_file)[2] == docs[0]


def test_plain_text_split_into_paragraphs(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("one\ntwo\n\n\nthree\n")
    assert corpus.read_text_corpus(path) == ["one\ntwo", "three"]


def test_corpus_samples_prefix_truncation_and_chunks():
    tok = CharTokenizer()
    docs = ["a" * 25, "b" * 5]
    first = corpus.corpus_samples(tok, docs, n_samples=2, max_length=11)
    assert first == [[1] + tok("a" * 10, False)["input_ids"], [1] + tok("b" * 5, False)["input_ids"]]
    more = corpus.corpus_samples(tok, docs, n_samples=10, max_length=11)  # corpus exhausted at 4
    assert [len(s) for s in more] == [11, 6, 11, 6]
    assert all(s[0] == 1 for s in more)
