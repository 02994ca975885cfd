"""Language codes and their English names, for prompts and instruction templates."""

LANGUAGE_NAMES = {
    "en": "English", "et": "Estonian", "pl": "Polish", "fi": "Finnish", "lv": "Latvian", "lt": "Lithuanian",
    "de": "German", "fr": "French", "ru": "Russian", "uk": "Ukrainian", "cs": "Czech", "es": "Spanish",
}


def language_name(code: str) -> str:
    """'et' -> 'Estonian'; an unknown code stands for itself."""
    return LANGUAGE_NAMES.get(code, code)
