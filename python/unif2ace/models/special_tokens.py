"""The special tokens of the unified model, in one place (the text tokenizer and the model layer
both import them from here; the data layer imports the model layer, never the reverse).

Show-o's layout: a text prompt, then ``<|soi|>`` image tokens ``<|eoi|>``; a task token in front says
what the sequence is for (``<|t2i|>`` text-to-image generation, ``<|mmu|>`` multimodal
understanding: captioning / VQA). The trained text tokenizer gives them the first ids, in this order,
so ``PAD_ID == 0`` etc. hold for every SynthFace tokenizer; a user-supplied ``tokenizer.json`` gets
the missing ones appended (look ids up with ``TextTokenizer.token_id``, do not hard-code them then).
"""

PAD = "<|pad|>"
EOT = "<|endoftext|>"  # end of a text segment (also used as BOS)
SOI = "<|soi|>"  # start of image tokens
EOI = "<|eoi|>"  # end of image tokens
T2I = "<|t2i|>"  # task: text -> image
MMU = "<|mmu|>"  # task: image -> text (caption, VQA)
USER = "<|user|>"  # start of a question / instruction
ASSISTANT = "<|assistant|>"  # start of the answer
UNK = "<|unk|>"  # never produced by byte-level BPE; reserved for foreign tokenizers

SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOT, SOI, EOI, T2I, MMU, USER, ASSISTANT, UNK)

PAD_ID, EOT_ID, SOI_ID, EOI_ID, T2I_ID, MMU_ID, USER_ID, ASSISTANT_ID, UNK_ID = range(
    len(SPECIAL_TOKENS)
)
