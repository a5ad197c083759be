from vqtok.cli import main

main()
