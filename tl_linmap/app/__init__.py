"""Applications for people rather than code: the HTML report and the command-line demo."""
