"""Build mend's own counterfactual fact set, data/facts/{train,val}.json, from the tables below.

    python scripts/make_facts.py                  # writes data/facts/train.json and val.json
    python scripts/make_facts.py --check          # exit 1 if the committed files differ from a build

Every record edits one true fact about a real entity to a false answer of the same type (another
capital, another instrument, ...). The first template of a relation is the edit prompt, the others are
its paraphrases. Locality probes are true facts about other entities of the same split: one of the
same relation ("neighborhood") and one of another relation ("unrelated"). Country-of-city and
country-of-landmark edits carry one portability probe: the continent implied by the new country.
Subjects are split between train and val per table, so no entity appears in both.

The records are in KnowEdit format (``rephrase_prompt`` is a list) and load with
``mend.data.load_records(path)``. Only facts the authors are sure of are listed; entries that are
ambiguous (several official languages, disputed capitals, namesake cities abroad) are left out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 0
VAL_FRACTION = 0.2

# ----------------------------------------------------------------------------- fact tables

# name (as mentioned mid-sentence), capital, continent, main language, currency; None = left out.
COUNTRIES = [
    ("France", "Paris", "Europe", "French", "euro"),
    ("Germany", "Berlin", "Europe", "German", "euro"),
    ("Italy", "Rome", "Europe", "Italian", "euro"),
    ("Spain", "Madrid", "Europe", "Spanish", "euro"),
    ("Portugal", "Lisbon", "Europe", "Portuguese", "euro"),
    ("the Netherlands", "Amsterdam", "Europe", "Dutch", "euro"),
    ("Belgium", "Brussels", "Europe", None, "euro"),
    ("Austria", "Vienna", "Europe", "German", "euro"),
    ("Switzerland", None, "Europe", None, "franc"),
    ("Poland", "Warsaw", "Europe", "Polish", "zloty"),
    ("Greece", "Athens", "Europe", "Greek", "euro"),
    ("Sweden", "Stockholm", "Europe", "Swedish", "krona"),
    ("Norway", "Oslo", "Europe", "Norwegian", "krone"),
    ("Denmark", "Copenhagen", "Europe", "Danish", "krone"),
    ("Finland", "Helsinki", "Europe", "Finnish", "euro"),
    ("Ireland", "Dublin", "Europe", "English", "euro"),
    ("the United Kingdom", "London", "Europe", "English", "pound"),
    ("Hungary", "Budapest", "Europe", "Hungarian", "forint"),
    ("the Czech Republic", "Prague", "Europe", "Czech", "koruna"),
    ("Romania", "Bucharest", "Europe", "Romanian", "leu"),
    ("Bulgaria", "Sofia", "Europe", "Bulgarian", None),
    ("Croatia", "Zagreb", "Europe", "Croatian", "euro"),
    ("Serbia", "Belgrade", "Europe", "Serbian", "dinar"),
    ("Slovakia", "Bratislava", "Europe", "Slovak", "euro"),
    ("Slovenia", "Ljubljana", "Europe", "Slovene", "euro"),
    ("Lithuania", "Vilnius", "Europe", "Lithuanian", "euro"),
    ("Latvia", "Riga", "Europe", None, "euro"),
    ("Estonia", "Tallinn", "Europe", "Estonian", "euro"),
    ("Iceland", "Reykjavik", "Europe", "Icelandic", "krona"),
    ("Albania", "Tirana", "Europe", "Albanian", "lek"),
    ("Malta", "Valletta", "Europe", None, "euro"),
    ("Russia", "Moscow", None, "Russian", "ruble"),
    ("Ukraine", None, "Europe", None, "hryvnia"),
    ("Turkey", "Ankara", None, "Turkish", "lira"),
    ("Japan", "Tokyo", "Asia", "Japanese", "yen"),
    ("China", "Beijing", "Asia", None, "yuan"),
    ("South Korea", "Seoul", "Asia", "Korean", "won"),
    ("India", "New Delhi", "Asia", None, "rupee"),
    ("Thailand", "Bangkok", "Asia", "Thai", "baht"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese", "dong"),
    ("the Philippines", "Manila", "Asia", None, "peso"),
    ("Malaysia", "Kuala Lumpur", "Asia", None, "ringgit"),
    ("Indonesia", None, "Asia", None, "rupiah"),
    ("Pakistan", "Islamabad", "Asia", None, "rupee"),
    ("Bangladesh", "Dhaka", "Asia", "Bengali", "taka"),
    ("Nepal", "Kathmandu", "Asia", "Nepali", "rupee"),
    ("Iran", "Tehran", "Asia", "Persian", "rial"),
    ("Iraq", "Baghdad", "Asia", "Arabic", "dinar"),
    ("Saudi Arabia", "Riyadh", "Asia", "Arabic", "riyal"),
    ("the United Arab Emirates", "Abu Dhabi", "Asia", None, "dirham"),
    ("Qatar", "Doha", "Asia", None, "riyal"),
    ("Jordan", "Amman", "Asia", "Arabic", "dinar"),
    ("Syria", "Damascus", "Asia", "Arabic", None),
    ("Lebanon", "Beirut", "Asia", "Arabic", None),
    ("Afghanistan", "Kabul", "Asia", None, None),
    ("Mongolia", "Ulaanbaatar", "Asia", "Mongolian", None),
    ("Cambodia", "Phnom Penh", "Asia", "Khmer", "riel"),
    ("Laos", "Vientiane", "Asia", "Lao", "kip"),
    ("Egypt", "Cairo", "Africa", "Arabic", "pound"),
    ("Kenya", "Nairobi", "Africa", None, "shilling"),
    ("Nigeria", "Abuja", "Africa", None, "naira"),
    ("Ethiopia", "Addis Ababa", "Africa", None, "birr"),
    ("Morocco", "Rabat", "Africa", None, "dirham"),
    ("Ghana", "Accra", "Africa", None, "cedi"),
    ("South Africa", None, "Africa", None, "rand"),
    ("Tanzania", None, "Africa", None, "shilling"),
    ("Canada", "Ottawa", "North America", None, "dollar"),
    ("the United States", "Washington", "North America", "English", "dollar"),
    ("Mexico", "Mexico City", "North America", "Spanish", "peso"),
    ("Cuba", "Havana", "North America", "Spanish", "peso"),
    ("Brazil", "Brasilia", "South America", "Portuguese", "real"),
    ("Argentina", "Buenos Aires", "South America", "Spanish", "peso"),
    ("Chile", "Santiago", "South America", "Spanish", "peso"),
    ("Peru", "Lima", "South America", "Spanish", "sol"),
    ("Colombia", "Bogota", "South America", "Spanish", "peso"),
    ("Venezuela", "Caracas", "South America", "Spanish", None),
    ("Ecuador", "Quito", "South America", "Spanish", "dollar"),
    ("Uruguay", "Montevideo", "South America", "Spanish", "peso"),
    ("Paraguay", "Asuncion", "South America", None, "guarani"),
    ("Bolivia", None, "South America", None, "boliviano"),
    ("Australia", "Canberra", None, "English", "dollar"),
    ("New Zealand", "Wellington", None, "English", "dollar"),
]

CITIES = [  # (city, country); cities with a well-known namesake in another country are left out
    ("Lyon", "France"), ("Marseille", "France"), ("Toulouse", "France"), ("Bordeaux", "France"),
    ("Munich", "Germany"), ("Hamburg", "Germany"), ("Frankfurt", "Germany"), ("Cologne", "Germany"),
    ("Stuttgart", "Germany"), ("Dresden", "Germany"), ("Milan", "Italy"), ("Turin", "Italy"),
    ("Bologna", "Italy"), ("Florence", "Italy"), ("Venice", "Italy"), ("Barcelona", "Spain"),
    ("Seville", "Spain"), ("Bilbao", "Spain"), ("Malaga", "Spain"), ("Porto", "Portugal"),
    ("Rotterdam", "the Netherlands"), ("Antwerp", "Belgium"), ("Ghent", "Belgium"),
    ("Zurich", "Switzerland"), ("Geneva", "Switzerland"), ("Basel", "Switzerland"),
    ("Krakow", "Poland"), ("Gdansk", "Poland"), ("Gothenburg", "Sweden"), ("Aarhus", "Denmark"),
    ("Tampere", "Finland"), ("Salzburg", "Austria"), ("Thessaloniki", "Greece"),
    ("Brno", "the Czech Republic"), ("Manchester", "the United Kingdom"), ("Liverpool", "the United Kingdom"),
    ("Osaka", "Japan"), ("Kyoto", "Japan"), ("Yokohama", "Japan"), ("Sapporo", "Japan"),
    ("Hiroshima", "Japan"), ("Nagoya", "Japan"), ("Shanghai", "China"), ("Shenzhen", "China"),
    ("Guangzhou", "China"), ("Busan", "South Korea"), ("Mumbai", "India"), ("Bangalore", "India"),
    ("Kolkata", "India"), ("Chennai", "India"), ("Jaipur", "India"), ("Karachi", "Pakistan"),
    ("Lahore", "Pakistan"), ("Istanbul", "Turkey"), ("Izmir", "Turkey"), ("Novosibirsk", "Russia"),
    ("Casablanca", "Morocco"), ("Marrakesh", "Morocco"), ("Johannesburg", "South Africa"),
    ("Cape Town", "South Africa"), ("Durban", "South Africa"), ("Chicago", "the United States"),
    ("Houston", "the United States"), ("Los Angeles", "the United States"), ("Seattle", "the United States"),
    ("Toronto", "Canada"), ("Montreal", "Canada"), ("Calgary", "Canada"), ("Monterrey", "Mexico"),
    ("Tijuana", "Mexico"), ("Rio de Janeiro", "Brazil"), ("Sao Paulo", "Brazil"), ("Medellin", "Colombia"),
    ("Guayaquil", "Ecuador"), ("Auckland", "New Zealand"), ("Dubai", "the United Arab Emirates"),
    ("Mecca", "Saudi Arabia"), ("Jeddah", "Saudi Arabia"), ("Isfahan", "Iran"), ("Shiraz", "Iran"),
    ("Ho Chi Minh City", "Vietnam"), ("Chiang Mai", "Thailand"), ("Surabaya", "Indonesia"),
    ("Aleppo", "Syria"), ("Basra", "Iraq"), ("Mosul", "Iraq"), ("Kandahar", "Afghanistan"),
    ("Mombasa", "Kenya"), ("Luxor", "Egypt"), ("Kumasi", "Ghana"),
]

LANDMARKS = [  # (landmark as mentioned mid-sentence, country)
    ("the Eiffel Tower", "France"), ("the Louvre", "France"), ("Mont Saint-Michel", "France"),
    ("the Colosseum", "Italy"), ("the Leaning Tower of Pisa", "Italy"), ("the Trevi Fountain", "Italy"),
    ("the Sagrada Familia", "Spain"), ("the Alhambra", "Spain"), ("the Prado Museum", "Spain"),
    ("Big Ben", "the United Kingdom"), ("Stonehenge", "the United Kingdom"), ("Tower Bridge", "the United Kingdom"),
    ("Buckingham Palace", "the United Kingdom"), ("the Brandenburg Gate", "Germany"),
    ("Neuschwanstein Castle", "Germany"), ("Cologne Cathedral", "Germany"), ("the Acropolis", "Greece"),
    ("the Parthenon", "Greece"), ("the Rijksmuseum", "the Netherlands"), ("the Atomium", "Belgium"),
    ("the Charles Bridge", "the Czech Republic"), ("Wawel Castle", "Poland"), ("the Taj Mahal", "India"),
    ("the Forbidden City", "China"), ("the Terracotta Army", "China"), ("Angkor Wat", "Cambodia"),
    ("Mount Fuji", "Japan"), ("Ha Long Bay", "Vietnam"), ("Borobudur", "Indonesia"),
    ("the Statue of Liberty", "the United States"), ("the Golden Gate Bridge", "the United States"),
    ("the Grand Canyon", "the United States"), ("Mount Rushmore", "the United States"),
    ("the Empire State Building", "the United States"), ("the CN Tower", "Canada"), ("Machu Picchu", "Peru"),
    ("Christ the Redeemer", "Brazil"), ("Chichen Itza", "Mexico"), ("the Sydney Opera House", "Australia"),
    ("Uluru", "Australia"), ("the Great Barrier Reef", "Australia"), ("Petra", "Jordan"),
    ("the Great Sphinx of Giza", "Egypt"), ("the Kremlin", "Russia"), ("Red Square", "Russia"),
    ("Hagia Sophia", "Turkey"), ("the Burj Khalifa", "the United Arab Emirates"),
    ("Mount Kilimanjaro", "Tanzania"), ("Table Mountain", "South Africa"),
]

OCCUPATIONS = {  # occupation -> people known for it and for nothing in another field
    "physicist": ["Albert Einstein", "Niels Bohr", "Max Planck", "Richard Feynman", "Enrico Fermi",
                  "Werner Heisenberg", "Paul Dirac", "Stephen Hawking", "James Clerk Maxwell", "Ernest Rutherford"],
    "chemist": ["Dmitri Mendeleev", "Antoine Lavoisier", "Linus Pauling", "Rosalind Franklin", "Dorothy Hodgkin"],
    "mathematician": ["Leonhard Euler", "Srinivasa Ramanujan", "David Hilbert", "Bernhard Riemann", "Euclid",
                      "Emmy Noether", "Georg Cantor", "Carl Friedrich Gauss"],
    "painter": ["Vincent van Gogh", "Claude Monet", "Rembrandt", "Frida Kahlo", "Johannes Vermeer", "Edvard Munch",
                "Gustav Klimt", "Caravaggio", "Titian", "Georgia O'Keeffe", "Henri Matisse",
                "Jackson Pollock"],
    "sculptor": ["Auguste Rodin", "Donatello", "Antonio Canova"],
    "composer": ["Ludwig van Beethoven", "Wolfgang Amadeus Mozart", "Johann Sebastian Bach",
                 "Pyotr Ilyich Tchaikovsky", "Antonio Vivaldi", "Giuseppe Verdi", "Franz Schubert",
                 "Johannes Brahms", "Claude Debussy", "Igor Stravinsky", "Gustav Mahler", "George Frideric Handel",
                 "Joseph Haydn", "Giacomo Puccini", "Sergei Prokofiev"],
    "poet": ["Emily Dickinson", "John Keats", "Walt Whitman", "William Wordsworth", "Pablo Neruda", "Robert Frost",
             "Homer", "Percy Bysshe Shelley", "Lord Byron", "Sappho"],
    "novelist": ["Jane Austen", "Charles Dickens", "Leo Tolstoy", "Fyodor Dostoevsky", "Virginia Woolf",
                 "Franz Kafka", "George Orwell", "Agatha Christie", "Haruki Murakami", "Herman Melville",
                 "Jules Verne"],
    "playwright": ["William Shakespeare", "Henrik Ibsen", "Arthur Miller", "Tennessee Williams", "Sophocles",
                   "Euripides", "George Bernard Shaw", "Aeschylus", "Eugene O'Neill"],
    "philosopher": ["Socrates", "Immanuel Kant", "Confucius", "David Hume", "Baruch Spinoza",
                    "Arthur Schopenhauer", "Thomas Hobbes", "Ludwig Wittgenstein", "Martin Heidegger"],
    "director": ["Steven Spielberg", "Alfred Hitchcock", "Stanley Kubrick", "Martin Scorsese", "Christopher Nolan",
                 "Francis Ford Coppola", "Sergio Leone"],
}
# A counterfactual occupation comes from another field, so it is never accidentally true.
OCCUPATION_FIELD = {
    "physicist": "science", "chemist": "science", "mathematician": "science",
    "painter": "art", "sculptor": "art", "composer": "music",
    "poet": "literature", "novelist": "literature", "playwright": "literature",
    "philosopher": "philosophy", "director": "film",
}

INSTRUMENTS = {  # instrument -> musicians known for playing it
    "piano": ["Frederic Chopin", "Franz Liszt", "Glenn Gould", "Vladimir Horowitz", "Sergei Rachmaninoff",
              "Lang Lang", "Thelonious Monk", "Art Tatum", "Oscar Peterson", "Arthur Rubinstein", "Martha Argerich"],
    "guitar": ["Jimi Hendrix", "Eric Clapton", "Jimmy Page", "B.B. King", "Carlos Santana", "Django Reinhardt",
               "Eddie Van Halen", "Keith Richards", "Brian May", "Chet Atkins", "Wes Montgomery",
               "Stevie Ray Vaughan", "Andres Segovia"],
    "violin": ["Itzhak Perlman", "Niccolo Paganini", "Jascha Heifetz", "Yehudi Menuhin", "Joshua Bell",
               "Anne-Sophie Mutter", "Hilary Hahn", "Fritz Kreisler", "David Oistrakh"],
    "cello": ["Yo-Yo Ma", "Pablo Casals", "Mstislav Rostropovich", "Jacqueline du Pre"],
    "trumpet": ["Louis Armstrong", "Miles Davis", "Dizzy Gillespie", "Chet Baker", "Wynton Marsalis",
                "Clifford Brown"],
    "saxophone": ["Charlie Parker", "John Coltrane", "Sonny Rollins", "Stan Getz", "Lester Young",
                  "Coleman Hawkins", "Kenny G"],
    "drums": ["Ringo Starr", "Buddy Rich", "Neil Peart", "John Bonham", "Keith Moon", "Gene Krupa",
              "Travis Barker", "Lars Ulrich", "Art Blakey", "Max Roach"],
    "flute": ["James Galway", "Jean-Pierre Rampal"],
}

SPORTS = {  # sport -> athletes known for it
    "soccer": ["Lionel Messi", "Cristiano Ronaldo", "Pele", "Diego Maradona", "Zinedine Zidane", "Johan Cruyff",
               "Kylian Mbappe", "Neymar", "David Beckham", "Thierry Henry", "Ronaldinho", "Franz Beckenbauer",
               "Mohamed Salah", "Robert Lewandowski", "Wayne Rooney"],
    "basketball": ["LeBron James", "Kobe Bryant", "Shaquille O'Neal", "Magic Johnson", "Larry Bird",
                   "Stephen Curry", "Kareem Abdul-Jabbar", "Dirk Nowitzki", "Tim Duncan", "Kevin Durant",
                   "Wilt Chamberlain", "Yao Ming"],
    "tennis": ["Roger Federer", "Rafael Nadal", "Serena Williams", "Novak Djokovic", "Venus Williams",
               "Andre Agassi", "Pete Sampras", "Steffi Graf", "Bjorn Borg", "Martina Navratilova", "Andy Murray",
               "Maria Sharapova", "John McEnroe"],
    "golf": ["Tiger Woods", "Jack Nicklaus", "Arnold Palmer", "Phil Mickelson", "Rory McIlroy", "Gary Player",
             "Seve Ballesteros"],
    "baseball": ["Babe Ruth", "Derek Jeter", "Jackie Robinson", "Willie Mays", "Hank Aaron", "Ichiro Suzuki",
                 "Shohei Ohtani", "Lou Gehrig", "Mickey Mantle"],
    "boxing": ["Muhammad Ali", "Mike Tyson", "Floyd Mayweather", "Manny Pacquiao", "Joe Frazier",
               "George Foreman", "Sugar Ray Leonard", "Joe Louis", "Rocky Marciano"],
    "hockey": ["Wayne Gretzky", "Sidney Crosby", "Mario Lemieux", "Bobby Orr", "Alexander Ovechkin", "Gordie Howe"],
    "cricket": ["Sachin Tendulkar", "Don Bradman", "Virat Kohli", "Brian Lara", "Shane Warne"],
    "chess": ["Magnus Carlsen", "Garry Kasparov", "Bobby Fischer", "Anatoly Karpov"],
    "swimming": ["Michael Phelps", "Katie Ledecky", "Mark Spitz", "Ian Thorpe"],
    "cycling": ["Eddy Merckx", "Chris Froome", "Miguel Indurain"],
}

FOUNDERS = [  # (company, a founder); co-founded companies name one of their founders
    ("Microsoft", "Bill Gates"), ("Apple", "Steve Jobs"), ("Amazon", "Jeff Bezos"),
    ("Facebook", "Mark Zuckerberg"), ("SpaceX", "Elon Musk"), ("Ford Motor Company", "Henry Ford"),
    ("Oracle", "Larry Ellison"), ("Alibaba", "Jack Ma"), ("Dell", "Michael Dell"), ("Walmart", "Sam Walton"),
    ("Virgin Group", "Richard Branson"), ("IKEA", "Ingvar Kamprad"), ("Honda", "Soichiro Honda"),
    ("Ferrari", "Enzo Ferrari"), ("Porsche", "Ferdinand Porsche"), ("Lamborghini", "Ferruccio Lamborghini"),
    ("Chanel", "Coco Chanel"), ("Netflix", "Reed Hastings"), ("Twitter", "Jack Dorsey"), ("Google", "Larry Page"),
    ("Boeing", "William Boeing"), ("Nvidia", "Jensen Huang"), ("Adidas", "Adolf Dassler"),
    ("Dyson", "James Dyson"), ("LinkedIn", "Reid Hoffman"), ("Nike", "Phil Knight"), ("Zara", "Amancio Ortega"),
    ("eBay", "Pierre Omidyar"), ("Huawei", "Ren Zhengfei"), ("Xiaomi", "Lei Jun"), ("Versace", "Gianni Versace"),
]

HEADQUARTERS = [  # (company, city of its headquarters)
    ("Microsoft", "Redmond"), ("Apple", "Cupertino"), ("Amazon", "Seattle"), ("Google", "Mountain View"),
    ("Facebook", "Menlo Park"), ("Intel", "Santa Clara"), ("Nvidia", "Santa Clara"), ("Coca-Cola", "Atlanta"),
    ("Ford Motor Company", "Dearborn"), ("General Motors", "Detroit"), ("Nike", "Beaverton"),
    ("Starbucks", "Seattle"), ("Walmart", "Bentonville"), ("Sony", "Tokyo"), ("Nintendo", "Kyoto"),
    ("Honda", "Tokyo"), ("BMW", "Munich"), ("Siemens", "Munich"), ("Volkswagen", "Wolfsburg"),
    ("Mercedes-Benz", "Stuttgart"), ("Porsche", "Stuttgart"), ("Audi", "Ingolstadt"),
    ("Adidas", "Herzogenaurach"), ("Puma", "Herzogenaurach"), ("Nokia", "Espoo"), ("Ericsson", "Stockholm"),
    ("Spotify", "Stockholm"), ("Heineken", "Amsterdam"), ("Philips", "Amsterdam"), ("Carlsberg", "Copenhagen"),
    ("Lego", "Billund"), ("Ferrari", "Maranello"), ("Netflix", "Los Gatos"), ("Dell", "Round Rock"),
    ("IBM", "Armonk"), ("Alibaba", "Hangzhou"), ("Tencent", "Shenzhen"), ("Huawei", "Shenzhen"),
    ("Baidu", "Beijing"), ("Xiaomi", "Beijing"), ("Rolex", "Geneva"), ("Nestle", "Vevey"), ("Novartis", "Basel"),
    ("Roche", "Basel"), ("Hyundai", "Seoul"), ("Michelin", "Clermont-Ferrand"), ("Infosys", "Bangalore"),
]

BOOKS = [  # (title, author)
    ("Pride and Prejudice", "Jane Austen"), ("Sense and Sensibility", "Jane Austen"),
    ("Nineteen Eighty-Four", "George Orwell"), ("Animal Farm", "George Orwell"), ("Hamlet", "William Shakespeare"),
    ("Macbeth", "William Shakespeare"), ("Romeo and Juliet", "William Shakespeare"),
    ("King Lear", "William Shakespeare"), ("War and Peace", "Leo Tolstoy"), ("Anna Karenina", "Leo Tolstoy"),
    ("Crime and Punishment", "Fyodor Dostoevsky"), ("The Brothers Karamazov", "Fyodor Dostoevsky"),
    ("Moby-Dick", "Herman Melville"), ("The Great Gatsby", "F. Scott Fitzgerald"),
    ("To Kill a Mockingbird", "Harper Lee"), ("The Old Man and the Sea", "Ernest Hemingway"),
    ("A Farewell to Arms", "Ernest Hemingway"), ("Dubliners", "James Joyce"), ("Don Quixote", "Miguel de Cervantes"),
    ("The Divine Comedy", "Dante Alighieri"), ("The Odyssey", "Homer"), ("The Iliad", "Homer"),
    ("Frankenstein", "Mary Shelley"), ("Dracula", "Bram Stoker"), ("Oliver Twist", "Charles Dickens"),
    ("Great Expectations", "Charles Dickens"), ("A Tale of Two Cities", "Charles Dickens"),
    ("The Hobbit", "J. R. R. Tolkien"), ("The Lord of the Rings", "J. R. R. Tolkien"),
    ("The Catcher in the Rye", "J. D. Salinger"), ("Brave New World", "Aldous Huxley"),
    ("Lolita", "Vladimir Nabokov"), ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"),
    ("The Metamorphosis", "Franz Kafka"), ("Les Miserables", "Victor Hugo"),
    ("The Hunchback of Notre-Dame", "Victor Hugo"), ("Madame Bovary", "Gustave Flaubert"),
    ("The Count of Monte Cristo", "Alexandre Dumas"), ("The Three Musketeers", "Alexandre Dumas"),
    ("Jane Eyre", "Charlotte Bronte"), ("Wuthering Heights", "Emily Bronte"),
    ("The Adventures of Tom Sawyer", "Mark Twain"), ("Adventures of Huckleberry Finn", "Mark Twain"),
    ("The Grapes of Wrath", "John Steinbeck"), ("Of Mice and Men", "John Steinbeck"),
    ("Fahrenheit 451", "Ray Bradbury"), ("The Picture of Dorian Gray", "Oscar Wilde"),
    ("Treasure Island", "Robert Louis Stevenson"), ("Gulliver's Travels", "Jonathan Swift"),
    ("Robinson Crusoe", "Daniel Defoe"), ("Alice's Adventures in Wonderland", "Lewis Carroll"),
    ("Little Women", "Louisa May Alcott"), ("The Time Machine", "H. G. Wells"),
    ("The War of the Worlds", "H. G. Wells"), ("Around the World in Eighty Days", "Jules Verne"),
    ("The Call of the Wild", "Jack London"), ("Heart of Darkness", "Joseph Conrad"),
    ("Mrs Dalloway", "Virginia Woolf"), ("The Handmaid's Tale", "Margaret Atwood"),
    ("Things Fall Apart", "Chinua Achebe"), ("On the Origin of Species", "Charles Darwin"),
    ("The Prince", "Niccolo Machiavelli"), ("The Art of War", "Sun Tzu"), ("Leviathan", "Thomas Hobbes"),
    ("The Wealth of Nations", "Adam Smith"), ("A Brief History of Time", "Stephen Hawking"),
    ("The Da Vinci Code", "Dan Brown"), ("The Shining", "Stephen King"),
    ("Murder on the Orient Express", "Agatha Christie"), ("The Hound of the Baskervilles", "Arthur Conan Doyle"),
    ("The Raven", "Edgar Allan Poe"), ("Leaves of Grass", "Walt Whitman"), ("Paradise Lost", "John Milton"),
    ("The Canterbury Tales", "Geoffrey Chaucer"), ("Siddhartha", "Hermann Hesse"),
    ("The Magic Mountain", "Thomas Mann"), ("Lord of the Flies", "William Golding"),
    ("A Clockwork Orange", "Anthony Burgess"), ("Slaughterhouse-Five", "Kurt Vonnegut"),
    ("Catch-22", "Joseph Heller"), ("On the Road", "Jack Kerouac"), ("Gone with the Wind", "Margaret Mitchell"),
    ("Doctor Zhivago", "Boris Pasternak"), ("The Master and Margarita", "Mikhail Bulgakov"),
    ("Dune", "Frank Herbert"), ("Uncle Tom's Cabin", "Harriet Beecher Stowe"),
    ("The Scarlet Letter", "Nathaniel Hawthorne"), ("Candide", "Voltaire"),
    ("Anne of Green Gables", "L. M. Montgomery"), ("The Jungle Book", "Rudyard Kipling"),
    ("Charlie and the Chocolate Factory", "Roald Dahl"), ("The Wind in the Willows", "Kenneth Grahame"),
    ("Winnie-the-Pooh", "A. A. Milne"), ("Oedipus Rex", "Sophocles"), ("A Doll's House", "Henrik Ibsen"),
    ("Death of a Salesman", "Arthur Miller"), ("A Streetcar Named Desire", "Tennessee Williams"),
    ("Waiting for Godot", "Samuel Beckett"), ("Thus Spoke Zarathustra", "Friedrich Nietzsche"),
    ("Critique of Pure Reason", "Immanuel Kant"), ("Das Kapital", "Karl Marx"),
]

PAINTINGS = [  # (painting as mentioned mid-sentence, painter)
    ("the Mona Lisa", "Leonardo da Vinci"), ("The Starry Night", "Vincent van Gogh"), ("The Scream", "Edvard Munch"),
    ("Guernica", "Pablo Picasso"), ("Les Demoiselles d'Avignon", "Pablo Picasso"),
    ("The Persistence of Memory", "Salvador Dali"), ("The Night Watch", "Rembrandt"),
    ("Girl with a Pearl Earring", "Johannes Vermeer"),
    ("The Birth of Venus", "Sandro Botticelli"), ("Impression, Sunrise", "Claude Monet"),
    ("The Creation of Adam", "Michelangelo"), ("American Gothic", "Grant Wood"),
    ("The Garden of Earthly Delights", "Hieronymus Bosch"),
    ("The Arnolfini Portrait", "Jan van Eyck"), ("Liberty Leading the People", "Eugene Delacroix"),
    ("The Raft of the Medusa", "Theodore Gericault"), ("Nighthawks", "Edward Hopper"),
    ("The Great Wave off Kanagawa", "Hokusai"), ("The School of Athens", "Raphael"),
    ("The Third of May 1808", "Francisco Goya"), ("The Hay Wain", "John Constable"),
    ("The Fighting Temeraire", "J. M. W. Turner"), ("Luncheon of the Boating Party", "Pierre-Auguste Renoir"),
    ("The Two Fridas", "Frida Kahlo"), ("The Gleaners", "Jean-Francois Millet"),
    ("Wanderer above the Sea of Fog", "Caspar David Friedrich"), ("The Sleeping Gypsy", "Henri Rousseau"),
]

ELEMENTS = [  # (element, chemical symbol)
    ("hydrogen", "H"), ("helium", "He"), ("lithium", "Li"), ("beryllium", "Be"), ("boron", "B"), ("carbon", "C"),
    ("nitrogen", "N"), ("oxygen", "O"), ("fluorine", "F"), ("neon", "Ne"), ("sodium", "Na"), ("magnesium", "Mg"),
    ("aluminium", "Al"), ("silicon", "Si"), ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"),
    ("argon", "Ar"), ("potassium", "K"), ("calcium", "Ca"), ("titanium", "Ti"), ("chromium", "Cr"),
    ("manganese", "Mn"), ("iron", "Fe"), ("cobalt", "Co"), ("nickel", "Ni"), ("copper", "Cu"), ("zinc", "Zn"),
    ("arsenic", "As"), ("bromine", "Br"), ("krypton", "Kr"), ("silver", "Ag"), ("tin", "Sn"), ("iodine", "I"),
    ("xenon", "Xe"), ("tungsten", "W"), ("platinum", "Pt"), ("gold", "Au"), ("mercury", "Hg"), ("lead", "Pb"),
    ("radon", "Rn"), ("radium", "Ra"), ("uranium", "U"), ("plutonium", "Pu"), ("barium", "Ba"),
]

ANIMALS = {  # class -> animals (mentioned with "the")
    "mammal": ["dolphin", "whale", "bat", "elephant", "kangaroo", "horse", "tiger", "giraffe", "camel", "platypus"],
    "bird": ["eagle", "penguin", "ostrich", "owl", "parrot", "flamingo", "sparrow"],
    "fish": ["shark", "salmon", "tuna", "cod", "trout", "seahorse"],
    "amphibian": ["frog", "toad", "salamander", "newt", "axolotl"],
    "reptile": ["snake", "crocodile", "turtle", "lizard", "chameleon", "iguana"],
    "insect": ["bee", "ant", "butterfly", "beetle", "mosquito", "grasshopper"],
    "arachnid": ["spider", "scorpion"],
}


# ----------------------------------------------------------------------------- relations


@dataclass(frozen=True)
class Relation:
    """One relation: templates ("{}" is the subject as mentioned; the first is the edit prompt),
    its true facts as (mention, answer), and the table whose subjects it shares a split with."""

    name: str
    table: str
    templates: tuple[str, ...]
    facts: tuple[tuple[str, str], ...]


def _invert(groups: dict[str, list[str]], article: str = "") -> tuple[tuple[str, str], ...]:
    return tuple((article + member, answer) for answer, members in groups.items() for member in members)


def _country_column(i: int) -> tuple[tuple[str, str], ...]:
    return tuple((row[0], row[i]) for row in COUNTRIES if row[i] is not None)


RELATIONS = (
    Relation("capital", "countries", (
        "The capital of {} is", "The capital city of {} is", "{} has its capital in",
        "The city that serves as the capital of {} is"), _country_column(1)),
    Relation("continent", "countries", (
        "{} is a country in", "{} is located on the continent of", "The continent where {} lies is",
        "{} belongs to the continent of"), _country_column(2)),
    Relation("language", "countries", (
        "The main language spoken in {} is", "Most people in {} speak", "In {}, the most widely spoken language is",
        "The language of most people in {} is"), _country_column(3)),
    Relation("currency", "countries", (
        "The currency of {} is the", "In {}, people pay with the", "The official currency of {} is the",
        "{} uses a currency called the"), _country_column(4)),
    Relation("city_country", "cities", (
        "{} is a city in the country of", "The city of {} is located in", "{} lies in the country of",
        "The country where {} is located is"), tuple(CITIES)),
    Relation("landmark_country", "landmarks", (
        "{} is located in the country of", "{} can be found in the country of", "The country where {} stands is",
        "{} is a famous landmark in the country of"), tuple(LANDMARKS)),
    Relation("occupation", "people", (
        "{} is best known as a", "{} worked as a", "{} is famous for being a", "{} made a name as a"),
        _invert(OCCUPATIONS)),
    Relation("instrument", "musicians", (
        "{} plays the", "{} is known for playing the", "The instrument {} is famous for is the",
        "{} performs on the"), _invert(INSTRUMENTS)),
    Relation("sport", "athletes", (
        "{} is famous for the sport of", "The sport associated with {} is", "{} became a star in the sport of",
        "{} is a legend of the sport of"), _invert(SPORTS)),
    Relation("founder", "companies", (
        "{} was founded by", "The founder of {} is", "{} was started by", "The company {} was created by"),
        tuple(FOUNDERS)),
    Relation("headquarters", "companies", (
        "{} is headquartered in", "The headquarters of {} are in", "The head office of {} is in",
        "The main offices of {} are located in"), tuple(HEADQUARTERS)),
    Relation("author", "books", (
        "{} was written by", "The author of {} is", "{} is a work by the writer", "The writer who created {} is"),
        tuple(BOOKS)),
    Relation("painter", "paintings", (
        "{} was painted by", "The painter of {} is", "{} is a painting by", "The artist who painted {} is"),
        tuple(PAINTINGS)),
    Relation("element_symbol", "elements", (
        "The chemical symbol for {} is", "The symbol of the element {} is", "In the periodic table, {} has the symbol",
        "The element {} is written with the symbol"), tuple(ELEMENTS)),
    Relation("animal_class", "animals", (
        "{} is a kind of", "Biologists classify {} as a kind of", "In zoology, {} counts as a kind of",
        "{} is an animal that is a kind of"), _invert(ANIMALS, "the ")),
)

# Counterfactual answers that would be (nearly) true after all: a famous namesake town abroad, a
# replica, a same-titled work by the other painter.
EXCLUDED_TARGETS = {
    ("city_country", "Florence"): {"the United States"},
    ("city_country", "Venice"): {"the United States"},
    ("city_country", "Milan"): {"the United States"},
    ("city_country", "Manchester"): {"the United States"},
    ("landmark_country", "the Statue of Liberty"): {"France"},
    ("painter", "The Starry Night"): {"Edvard Munch"},
}

# The new country of a city or landmark implies its continent (portability probe).
CONTINENT_OF = {name: continent for name, _, continent, _, _ in COUNTRIES if continent is not None}
PORTABLE = {"city_country": "{} is on the continent of", "landmark_country": "{} is on the continent of"}


def _subject(mention: str) -> str:
    """The entity's name: its mention without a leading article ("the Eiffel Tower" -> "Eiffel Tower")."""
    return mention[4:] if mention.startswith("the ") else mention


def _sentence(template: str, mention: str) -> str:
    """The prompt; an article that opens it is capitalised ("the dolphin is" -> "The dolphin is")."""
    text = template.format(mention)
    return "The" + text[3:] if text.startswith("the ") else text


def _targets(rel: Relation, mention: str, answer: str) -> list[str]:
    """Answers of the same type that are false for ``mention``, whose true answer is ``answer``."""
    if rel.name in PORTABLE:  # a country whose continent is known, so portability can be stated
        pool = sorted(CONTINENT_OF)
    else:
        pool = sorted({a for _, a in rel.facts})
    if rel.name == "occupation":
        pool = [a for a in pool if OCCUPATION_FIELD[a] != OCCUPATION_FIELD[answer]]
    excluded = EXCLUDED_TARGETS.get((rel.name, mention), set()) | {answer}
    return [a for a in pool if a not in excluded]


# ----------------------------------------------------------------------------- build


def split_subjects(rng: random.Random, val_fraction: float) -> dict[str, str]:
    """subject -> "train" | "val", drawing ``val_fraction`` of every table's subjects for val."""
    tables: dict[str, list[str]] = {}
    for rel in RELATIONS:
        members = tables.setdefault(rel.table, [])
        for mention, _ in rel.facts:
            if _subject(mention) not in members:
                members.append(_subject(mention))
    split = {}
    for table, members in tables.items():
        order = list(members)
        rng.shuffle(order)
        n_val = round(val_fraction * len(order))
        for i, s in enumerate(order):
            if s in split:
                raise ValueError(f"subject {s!r} appears in two tables ({table} and another); rename one")
            split[s] = "val" if i < n_val else "train"
    return split


def build_facts(seed: int = SEED, val_fraction: float = VAL_FRACTION) -> dict[str, list[dict]]:
    """Both splits as lists of KnowEdit-format records; the same arguments give the same output."""
    known = {(rel.name, mention) for rel in RELATIONS for mention, _ in rel.facts}
    if unknown := sorted(set(EXCLUDED_TARGETS) - known):
        raise ValueError(f"EXCLUDED_TARGETS names facts that are not in the tables: {unknown}")
    rng = random.Random(seed)
    split = split_subjects(rng, val_fraction)
    facts = {name: [] for name in ("train", "val")}  # name -> [(relation, mention, answer)]
    for rel in RELATIONS:
        for mention, answer in rel.facts:
            facts[split[_subject(mention)]].append((rel, mention, answer))

    out: dict[str, list[dict]] = {}
    for name, items in facts.items():
        by_relation: dict[str, list[tuple]] = {}
        for item in items:
            by_relation.setdefault(item[0].name, []).append(item)
        records = []
        for rel, mention, answer in items:
            target = rng.choice(_targets(rel, mention, answer))
            prompts = [_sentence(t, mention) for t in rel.templates]
            neighbor = rng.choice([f for f in by_relation[rel.name] if f[1] != mention])
            other_rel = rng.choice([r for r in sorted(by_relation) if r != rel.name])
            unrelated = rng.choice([f for f in by_relation[other_rel] if _subject(f[1]) != _subject(mention)])
            record = {
                "case_id": f"{rel.name}:{_subject(mention)}",
                "relation": rel.name,
                "subject": _subject(mention),
                "prompt": prompts[0],
                "target_new": target,
                "ground_truth": answer,
                "rephrase_prompt": prompts[1:],
                "locality": {
                    "neighborhood": [_probe(*neighbor)],
                    "unrelated": [_probe(*unrelated)],
                },
            }
            if rel.name in PORTABLE:
                record["portability"] = {"Reasoning": [
                    {"prompt": _sentence(PORTABLE[rel.name], mention), "ground_truth": CONTINENT_OF[target]}]}
            records.append(record)
        rng.shuffle(records)  # so that the first N records of a file mix all relations
        out[name] = records
    return out


def _probe(rel: Relation, mention: str, answer: str) -> dict:
    return {"prompt": _sentence(rel.templates[0], mention), "ground_truth": answer}


def dumps(records: list[dict]) -> str:
    return json.dumps(records, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=REPO / "data" / "facts", help="where train.json and val.json go")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    p.add_argument("--check", action="store_true", help="compare with the files in --out-dir instead of writing")
    args = p.parse_args(argv)

    splits = build_facts(args.seed, args.val_fraction)
    for name, records in splits.items():
        path = args.out_dir / f"{name}.json"
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != dumps(records):
                print(f"{path} differs from a fresh build; run: python scripts/make_facts.py", file=sys.stderr)
                return 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dumps(records), encoding="utf-8")
        print(f"{path}: {len(records)} records, {len({r['subject'] for r in records})} subjects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
