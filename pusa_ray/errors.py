"""Errors raised for bad input from outside the code (files, requests, configs, flags)."""


class UserInputError(ValueError):
    """Input that the user can fix; the message names the offending value.

    The CLI prints it as one line and exits non-zero; the Serve layer turns it into a 4xx.
    """
