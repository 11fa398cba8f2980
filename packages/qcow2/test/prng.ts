export { seededRandom as prng } from "@qimg/io";
