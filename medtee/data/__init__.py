"""Chat records to training batches, in memory: synthetic demo data, demo tokenizer, Gemma 3 formatting, DataModule.

Submodules are imported where used; `medtee.data.module` pulls in torch and lightning.
"""
