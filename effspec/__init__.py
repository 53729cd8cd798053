"""effspec: make large language models cheaper to run and show what each saving costs."""

__version__ = "0.1.0"
