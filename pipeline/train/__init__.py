"""Step 6 of the method: fine-tune the base model on the generated pairs, then the original corpus.

`data.py` schedule/format/tokenize/pack (Ray Data), `loop.py` the per-worker loop (Ray Train),
`trainer.py` the TorchTrainer run with its checkpoints and resume, `report.py` report.md + loss.png.
"""
