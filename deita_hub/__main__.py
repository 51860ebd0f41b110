from deita_hub.cli import main

main()
