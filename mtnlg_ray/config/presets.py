"""Named model shapes. `ModelConfig(preset=NAME)` fills these fields; explicit fields override.

Shapes follow GPT-3 (Brown et al., 2020, table 2.1) and MT-NLG (Smith et al., 2022, section 3):
MT-NLG 530B has 105 layers, d_model 20480, 128 heads, sequence 2048, learned positions, and the
GPT-2 BPE vocabulary of 50257 padded (here to a multiple of 128: 50304 rows).
"""

PRESETS: dict[str, dict] = {
    # Well under 1M parameters with a 4k vocabulary: trains on CPU in seconds.
    "debug": dict(n_layers=2, d_model=64, n_heads=4, max_seq_len=128, position="learned"),
    "gpt-125m": dict(n_layers=12, d_model=768, n_heads=12, max_seq_len=2048, vocab_size=50257),
    "gpt-350m": dict(n_layers=24, d_model=1024, n_heads=16, max_seq_len=2048, vocab_size=50257),
    "gpt-1.3b": dict(n_layers=24, d_model=2048, n_heads=16, max_seq_len=2048, vocab_size=50257),
    "mtnlg-530b": dict(n_layers=105, d_model=20480, n_heads=128, max_seq_len=2048, vocab_size=50257),
}
