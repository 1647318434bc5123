from graftbuild.entry import main

main()
