"""``python -m freetumor_cli``: the same app as the ``freetumor`` console script."""

from freetumor_cli.app import main

if __name__ == "__main__":
    main()
