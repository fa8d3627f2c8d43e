"""Probe pairs for the semantic cache: paraphrases that may share an answer, contrasts that must not."""

PARAPHRASES = [
    ("12+7=", "12 + 7 ="),
    ("37+48=", "37 + 48 ="),
    ("sort 9 3 5 =", "sort 9 3 5="),
    ("sort 4 1 8 2 =", "sort  4 1 8 2 ="),
    ("How do I open a file in Python?", "How can I open a file in Python?"),
    ("What does the with statement do?", "What does the with statement do"),
    ("Explain the global statement", "explain the global statement"),
    ("def fibonacci(n):", "def fibonacci(n) :"),
    ("What is a generator expression?", "What's a generator expression?"),
    ("Describe the import system", "Describe the import system."),
]

CONTRASTS = [
    ("12+7=", "12+8="),
    ("12+7=", "12-7="),
    ("37+48=", "48+37="),
    ("sort 9 3 5 =", "sort 9 3 6 ="),
    ("sort 1 2 3 =", "sort 3 2 1 ="),
    ("enable the cache", "disable the cache"),
    ("sort the list in ascending order", "sort the list in descending order"),
    ("How do I open a file in Python?", "How do I not open a file in Python?"),
    ("return the smallest element", "return the largest element"),
    ("def add(a, b):", "def sub(a, b):"),
    ("convert the string to uppercase", "convert the string to lowercase"),
    ("include hidden files", "exclude hidden files"),
    ("What is 2 to the power of 10?", "What is 2 to the power of 11?"),
    ("is 7 an odd number", "is 7 an even number"),
    ("read the file named 'a.txt'", "read the file named 'b.txt'"),
    ("call get_user_by_id", "call get_user_by_name"),
]
