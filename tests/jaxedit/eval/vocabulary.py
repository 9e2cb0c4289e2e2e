"""A word tokenizer whose vocabulary holds the words of the evaluation tests."""
from jaxedit import testing

WORDS = ("the of is in a and capital France Paris London mother tongue Danielle Darrieux English French "
         "speaks language river city located continent Europe Asia piano guitar plays Toko Yasuda").split()


def word_tokenizer(vocab_size, add_bos):
    return testing.WordTokenizer(vocab_size, add_bos, known_words=WORDS)
