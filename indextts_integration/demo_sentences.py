"""English sentences shared by the demo dataset and the tiny checkpoint's BPE training corpus."""

DEMO_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "A gentle breeze carried the smell of rain across the valley.",
    "Please remember to close the window before you leave.",
    "She opened the old book and found a letter inside.",
    "Every morning the baker starts work before sunrise.",
    "We watched the boats drift slowly along the river.",
    "Could you tell me the way to the nearest station?",
    "The children laughed as the puppy chased its tail.",
    "Fresh bread and warm soup make a perfect winter lunch.",
    "He practised the piano for two hours every evening.",
    "Bright stars filled the sky above the quiet village.",
    "Thank you for listening, and have a wonderful day.",
    "The museum is closed on Mondays but open late on Fridays.",
    "My grandmother grew tomatoes, beans and tall yellow sunflowers.",
    "Just keep walking until you see the big red door.",
    "Why do cats always sit exactly where you want to work?",
)

# Extra text for the tokenizer only: covers every letter and common punctuation so nothing maps to <unk>.
BPE_EXTRA_TEXT: tuple[str, ...] = (
    "Pack my box with five dozen liquor jugs!",
    "How vexingly quick daft zebras jump, said Jacqueline.",
    "Sphinx of black quartz, judge my vow.",
    "One, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand.",
    "It's a well-known fact: questions end with a question mark? Yes!",
    "Hello world, this is a tiny voice model for tests.",
)
