"""Checkpoints of every kind: the one place that decides what a path is and reads or writes it.

    manifest.py      config.json, manifest.json and trainer_state.json: what a checkpoint says about itself
    remote.py        local paths and storage URIs, a run's checkpoint_* directories, fetching to this node
    native.py        the consolidated export: config.json + model.safetensors (+ tokenizer), and build_model
    sharded.py       DCP training checkpoints: save / load in the loop, consolidation in one process
    hf_gpt2.py       transformers GPT-2 directories, both ways
    hf_tokenizer.py  the tokenizer files of an HF export (tokenizer.json, tokenizer_config.json, ...)
    model_card.py    the README.md every export writes
    source.py        open_source(path): the kind of a path, its config, weights and tokenizer

It sits below train/ and serve/ and imports neither.
"""
