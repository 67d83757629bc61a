"""
Mid-training: continue the base model on the large conversation mixture (SmolTalk, MMLU auxiliary
train, GSM8K with calculator calls, identity and spelling conversations; the embedded synthetic
tasks with --mixture=synthetic), so that it learns the chat format, multiple choice and tool use
before SFT.

    python -m scripts.mid_train
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --run=mid1

The loop is shared with SFT: see scripts/chat_sft.py (STAGES["mid"] holds what differs). Checkpoints
go to <base>/mid_checkpoints/<tag>/.
"""

from scripts.chat_sft import main

if __name__ == "__main__":
    main("mid")
