"""Everything that knows UnifiedVoice / IndexTTS2: model-dir loaders, tiny checkpoint, data preparation."""
