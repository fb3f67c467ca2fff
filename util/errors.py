class UserError(Exception):
    """An error the user caused (bad file, flag or format); printed as one line, no traceback."""
