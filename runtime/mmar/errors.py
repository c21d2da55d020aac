"""The one exception type a user sees: a readable message naming the file and field at fault."""


class MMARError(Exception):
    """A user-facing error (bad input, bad config, missing files). The CLI prints it and exits 1."""


def user_error(error: BaseException) -> str | None:
    """The MMARError inside an exception chain, e.g. raised by a transform that MONAI wrapped.

    DataLoader workers re-raise errors as text: the MMARError's message is then taken from that text.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MMARError):
            return str(error)
        text = str(error)
        marker = "MMARError: "
        if marker in text:
            return text[text.rindex(marker) + len(marker):].strip().splitlines()[0]
        error = error.__cause__ or error.__context__
    return None
