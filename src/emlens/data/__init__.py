"""Layer 2: input data: chats, question sets and prompt lists, nudges, persona-vectors trait files."""
