from scenec.cli import main

main()
