"""The main job on the embedded default: load the offline SmolLM2 model and continue factual prompts."""
from absl import app, flags

from llama3_flax import checkpoint, generate

FLAGS = flags.DEFINE_string("model", "smollm2", "'smollm2', a .gguf file or a Hugging Face folder")

PROMPTS = ["The capital of France is", "The mother tongue of Danielle Darrieux is",
           "The Eiffel Tower is located in the city of", "Apple's iPhone is produced by"]


def main(_):
    cfg, params, tok = checkpoint.load_model(FLAGS.value)
    for prompt, text in zip(PROMPTS, generate.generate_text(params, cfg, tok, PROMPTS, max_new_tokens=12)):
        print(f"{prompt!r:50} -> {text!r}")


if __name__ == "__main__":
    app.run(main)
