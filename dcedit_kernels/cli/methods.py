"""The editing methods `dcedit` offers: their names as flags and in the output."""

METHOD_NAMES = {
    "ft": "FT",
    "ft_kl": "FT+KL",
    "mend": "MEND",
    "raeditor": "RaEditor",
    "moeditor": "MoEditor",
    "proeditor": "ProEditor",
}
EDITOR_METHODS = ("mend", "raeditor", "moeditor", "proeditor")
